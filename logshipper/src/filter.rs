//! Which files under a source root are logs to ship: include and exclude globs.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Airflow task logs and the triggerer's files beside them. Scheduler and dag-processor logs
/// are opt-in (`--include 'scheduler/**/*.log'`): they are still being written while Airflow
/// runs and Airflow's UI does not read them from remote storage.
pub const DEFAULT_INCLUDE: &[&str] = &[
    "dag_id=*/**/attempt=*.log",
    "dag_id=*/**/attempt=*.log.trigger.*.log",
];

/// A glob that does not parse, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("invalid glob `{glob}`: {source}")]
pub struct GlobError {
    glob: String,
    #[source]
    source: globset::Error,
}

/// Include and exclude globs over paths relative to a source root.
#[derive(Debug, Clone)]
pub struct Filter {
    include: GlobSet,
    exclude: GlobSet,
    /// Directories an include glob could match beneath: each glob's leading components.
    holders: GlobSet,
}

impl Filter {
    /// `*` and `?` never cross a `/`; `**` does.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, GlobError> {
        let holders: Vec<String> = include
            .iter()
            .flat_map(|glob| {
                let parts: Vec<&str> = glob.split('/').collect();
                (1..parts.len()).map(move |n| parts[..n].join("/"))
            })
            .collect();
        Ok(Self {
            include: glob_set(include)?,
            exclude: glob_set(exclude)?,
            holders: glob_set(&holders)?,
        })
    }

    pub fn matches(&self, relative: &str) -> bool {
        self.include.is_match(relative) && !self.exclude.is_match(relative)
    }

    /// Whether a directory at `relative` could hold files to ship: a symlink there is a
    /// linked log directory that is not followed, and worth a warning.
    pub fn may_hold(&self, relative: &str) -> bool {
        self.holders.is_match(relative)
    }
}

fn glob_set(globs: &[String]) -> Result<GlobSet, GlobError> {
    let mut set = GlobSetBuilder::new();
    for glob in globs {
        set.add(parse(glob)?);
    }
    set.build().map_err(|source| GlobError {
        glob: globs.join(", "),
        source,
    })
}

fn parse(glob: &str) -> Result<Glob, GlobError> {
    GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map_err(|source| GlobError {
            glob: glob.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(globs: &[&str]) -> Vec<String> {
        globs.iter().map(|g| g.to_string()).collect()
    }

    fn default_filter() -> Filter {
        Filter::new(&strings(DEFAULT_INCLUDE), &[]).unwrap()
    }

    #[test]
    fn default_includes_task_and_trigger_logs() {
        let filter = default_filter();
        for path in [
            "dag_id=etl/run_id=manual__2024-01-01T00:00:00+00:00/task_id=load/attempt=1.log",
            "dag_id=etl/run_id=scheduled__2024-01-01T00:00:00+00:00/task_id=fan/map_index=3/attempt=2.log",
            "dag_id=etl/run_id=r/task_id=wait/attempt=1.log.trigger.42.log",
        ] {
            assert!(filter.matches(path), "{path}");
        }
    }

    #[test]
    fn default_leaves_out_scheduler_and_other_files() {
        let filter = default_filter();
        for path in [
            "scheduler/2024-01-01/etl.py.log",
            "scheduler/latest",
            "dag_processor_manager/dag_processor_manager.log",
            "dag_id=etl/run_id=r/task_id=t/notes.txt",
            "dag_id=etl/run_id=r/task_id=t/.attempt=1.log.swp",
            "other/dag_id=etl/attempt=1.log",
        ] {
            assert!(!filter.matches(path), "{path}");
        }
    }

    #[test]
    fn scheduler_logs_are_opt_in() {
        let mut include = strings(DEFAULT_INCLUDE);
        include.push("scheduler/**/*.log".into());
        let filter = Filter::new(&include, &[]).unwrap();
        assert!(filter.matches("scheduler/2024-01-01/etl.py.log"));
        assert!(filter.matches("dag_id=a/run_id=r/task_id=t/attempt=1.log"));
    }

    #[test]
    fn exclude_wins() {
        let filter =
            Filter::new(&strings(DEFAULT_INCLUDE), &strings(&["dag_id=noisy/**"])).unwrap();
        assert!(!filter.matches("dag_id=noisy/run_id=r/task_id=t/attempt=1.log"));
        assert!(filter.matches("dag_id=quiet/run_id=r/task_id=t/attempt=1.log"));
    }

    #[test]
    fn star_does_not_cross_directories() {
        let filter = Filter::new(&strings(&["*.log"]), &[]).unwrap();
        assert!(filter.matches("a.log"));
        assert!(!filter.matches("dir/a.log"));
    }

    #[test]
    fn directories_that_may_hold_logs() {
        let filter = default_filter();
        for dir in [
            "dag_id=etl",
            "dag_id=etl/run_id=r",
            "dag_id=etl/run_id=r/task_id=t",
        ] {
            assert!(filter.may_hold(dir), "{dir}");
        }
        // Airflow's own `scheduler/latest` link is no log directory.
        for dir in ["scheduler", "scheduler/latest", "other"] {
            assert!(!filter.may_hold(dir), "{dir}");
        }
        let everywhere = Filter::new(&strings(&["**/*.log"]), &[]).unwrap();
        assert!(everywhere.may_hold("scheduler/latest"));
    }

    #[test]
    fn bad_glob_is_reported() {
        let err = Filter::new(&strings(&["dag_id=[*"]), &[]).unwrap_err();
        assert!(err.to_string().contains("dag_id=[*"), "{err}");
    }
}
