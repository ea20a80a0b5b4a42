"""Read task logs back through Airflow's own S3 log reader, the code the
Airflow UI runs, so the e2e tests prove Airflow finds what localship wrote.

Usage: read_logs.py --endpoint URL --remote-base s3://bucket/prefix PATH...
Credentials come from the standard AWS env vars (AWS_ACCESS_KEY_ID, ...).
Prints one JSON object: {PATH: {"keys": [s3 urls], "content": [text per key] | null}}.
"""

import argparse
import json
import os
import sys
import tempfile


def configure_airflow(endpoint: str, remote_base: str, home: str) -> None:
    """Remote logging to S3 through an `aws_default` connection at `endpoint`,
    set in the environment before `airflow` is imported (it reads config then)."""
    # Only this config: a developer's AIRFLOW_* settings must not change the reader.
    for name in [n for n in os.environ if n.startswith("AIRFLOW")]:
        del os.environ[name]
    os.environ.update(
        {
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": os.path.join(home, "logs"),
            "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
            "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": remote_base,
            "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": "aws_default",
            # No login/password: boto3 takes the keys from the AWS env vars.
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "extra": {
                        "endpoint_url": endpoint,
                        "region_name": os.environ.get("AWS_REGION", "us-east-1"),
                        # MinIO on loopback has no virtual-host bucket names.
                        "config_kwargs": {"s3": {"addressing_style": "path"}},
                    },
                }
            ),
        }
    )


def remote_log_io():
    """The RemoteLogIO the UI reads task logs with, built from the config above."""
    try:
        # Airflow 3: what FileTaskHandler._read_remote_logs asks airflow_local_settings for.
        from airflow.logging_config import get_remote_task_log
    except ImportError:
        # Airflow 2: the task log handler the UI's TaskLogReader uses, and its S3 IO.
        from airflow.utils.log.log_reader import TaskLogReader

        return getattr(TaskLogReader().log_handler, "io", None)
    return get_remote_task_log()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--remote-base", required=True)
    parser.add_argument("paths", nargs="+", help="log paths relative to the remote base")
    args = parser.parse_args()

    # Airflow may print to stdout; only the JSON result goes there.
    out = sys.stdout
    sys.stdout = sys.stderr

    with tempfile.TemporaryDirectory(prefix="airflow-home-") as home:
        configure_airflow(args.endpoint, args.remote_base, home)
        from airflow.providers.amazon.aws.log.s3_task_handler import S3RemoteLogIO

        reader = remote_log_io()
        if not isinstance(reader, S3RemoteLogIO):
            print(f"Airflow configured {reader!r}, not S3RemoteLogIO: check the config", file=sys.stderr)
            return 2
        result = {}
        for path in args.paths:
            # read() never touches the task instance, so none is needed. It
            # lists every key under the prefix (finding .trigger.*.log
            # siblings) and returns (keys, text per key) or (_, None).
            keys, logs = reader.read(path, None)
            result[path] = {"keys": list(keys), "content": logs}
    json.dump(result, out)
    out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
