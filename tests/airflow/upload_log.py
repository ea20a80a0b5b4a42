"""Upload a task log with Airflow's own S3 log code, exactly as a worker does
when a try ends or defers (the amazon provider's S3RemoteLogIO.upload: read
the whole local file, append it to whatever the key holds, and with
delete_local_logs remove the log's folder), so the tests can run localship
beside it.

Usage: upload_log.py --endpoint URL --remote-base s3://bucket/prefix
                     --base-log-folder DIR [--delete-local-copy] PATH
Credentials come from the standard AWS env vars. Prints {"uploaded": bool}.
"""

import argparse
import json
import sys
import tempfile

from read_logs import configure_airflow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--remote-base", required=True)
    parser.add_argument("--base-log-folder", required=True)
    parser.add_argument("--delete-local-copy", action="store_true")
    parser.add_argument("path", help="log path relative to the base log folder")
    args = parser.parse_args()

    out = sys.stdout
    sys.stdout = sys.stderr
    with tempfile.TemporaryDirectory(prefix="airflow-home-") as home:
        configure_airflow(args.endpoint, args.remote_base, home)
        from airflow.providers.amazon.aws.log.s3_task_handler import S3RemoteLogIO

        io = S3RemoteLogIO(
            remote_base=args.remote_base,
            base_log_folder=args.base_log_folder,
            delete_local_copy=args.delete_local_copy,
        )
        # The task instance is only passed through to the hook's logging.
        io.upload(args.path, None)
    json.dump({"uploaded": True}, out)
    out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
