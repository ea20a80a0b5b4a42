#!/usr/bin/env bash
# Installs an Airflow the e2e tests drive (read_logs.py, upload_log.py) into a
# venv in a cache outside the repository:
#   setup.sh [LOCK]   LOCK: requirements.lock (Airflow 3, the default) or
#                     requirements-2.10.lock (Airflow 2.10)
#   $LOCALSHIP_TEST_CACHE (default ~/.cache/localship-test)/airflow-<3|2.10>-<key>/
# The key changes with the lock or the Python version, so a warm run finds the
# venv and returns at once. $PYTHON picks the interpreter (python3).
# Prints the venv's python on its last line; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
lock_name=${1:-requirements.lock}
lock="$here/$lock_name"
[ -f "$lock" ] || { echo "airflow: no lock file $lock" >&2; exit 1; }
# "3" for requirements.lock, "2.10" for requirements-2.10.lock.
flavour=${lock_name#requirements}
flavour=${flavour%.lock}
flavour=${flavour#-}
flavour=${flavour:-3}
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "airflow: $python is missing or older than 3.10; Airflow 3 needs 3.10+ (set PYTHON=...)" >&2
  exit 1
fi

cache_root=${LOCALSHIP_TEST_CACHE:-$HOME/.cache/localship-test}
key=$( ("$python" -c 'import sys, platform; print(sys.version, platform.machine())'; cat "$lock") | sha256sum | cut -c1-12)
venv="$cache_root/airflow-$flavour-$key"
# Written last, so a venv from an interrupted install is never taken as done.
done_marker="$venv/.installed"

if [ -f "$done_marker" ]; then
  echo "airflow: cached in $venv" >&2
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$cache_root"
# Test processes and `make` may run this at once; one installs, the rest wait.
exec 9>"$cache_root/airflow-$flavour.lock"
flock 9
if [ ! -f "$done_marker" ]; then
  start=$(date +%s)
  echo "airflow: installing $(grep -E '^apache-airflow(-providers-amazon)?==' "$lock" | tr '\n' ' ')into $venv (cold install, a minute or two)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # Every package is pinned in the lock, so pip need not resolve anything.
  # Wheels where there are any; a few of Airflow 2's pins (python-nvd3) are
  # source only.
  "$venv/bin/python" -m pip install --quiet --no-deps --prefer-binary -r "$lock" >&2
  "$venv/bin/python" -m pip check >&2
  "$venv/bin/python" -c 'import airflow.providers.amazon.aws.log.s3_task_handler' >&2
  touch "$done_marker"
  # Venvs of older versions of this lock are dead weight (~370 MB each).
  find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name "airflow-$flavour-*" ! -name "airflow-$flavour-$key" -exec rm -rf {} +
  # So are those of the time there was one lock, named airflow-<key>.
  find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/airflow-[0-9a-f]{12}' -exec rm -rf {} +
  echo "airflow: installed in $(( $(date +%s) - start ))s" >&2
fi
echo "$venv/bin/python"
