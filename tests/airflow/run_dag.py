"""Run a DAG on a running `airflow standalone` through its REST API and read
each task's log through the HTTP endpoint the UI reads it from.

Usage: run_dag.py --major 2|3 --port PORT --home AIRFLOW_HOME --dag ID --run-id ID [--read]
Triggers the run and waits for it to finish; with --read, only reads the
finished run's logs. Prints one JSON object: {"state": run state, "tasks": {task_id: {"state": ...,
"lines": [the log view's lines, each a timestamped record as text]}}}.
"""

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request


class Api:
    def __init__(self, major: int, port: int, home: str):
        self.major = major
        self.base = f"http://127.0.0.1:{port}/api/v{1 if major == 2 else 2}"
        self.headers = {"Content-Type": "application/json"}
        if major == 2:
            # airflow standalone makes an admin with a password it writes here.
            password = open(os.path.join(home, "standalone_admin_password.txt")).read().strip()
            token = base64.b64encode(f"admin:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def call(self, method: str, path: str, body=None, accept="application/json"):
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers, Accept=accept)
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if accept == "application/json" else text


def wait(what: str, timeout: float, probe):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            result = probe()
            if result:
                return result
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            last = e
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what} (last error: {last})")


def view_lines(api: Api, dag: str, run: str, task: str, try_number: int) -> list:
    path = f"/dags/{dag}/dagRuns/{run}/taskInstances/{task}/logs/{try_number}?full_content=true"
    if api.major == 2:
        text = api.call("GET", path, accept="text/plain")
        return [line for line in text.splitlines() if line.startswith("[")]
    content = api.call("GET", path)["content"]
    return [f"{e['timestamp']} {e.get('event', '')}" for e in content if e.get("timestamp")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, choices=[2, 3], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--home", required=True)
    parser.add_argument("--dag", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--read", action="store_true", help="only read the finished run's logs")
    args = parser.parse_args()

    if args.major == 2:
        wait("the admin password", args.timeout,
             lambda: os.path.exists(os.path.join(args.home, "standalone_admin_password.txt")))
    api = Api(args.major, args.port, args.home)
    wait(f"DAG {args.dag} to be parsed", args.timeout, lambda: api.call("GET", f"/dags/{args.dag}"))

    def healthy():
        health = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{args.port}/{'health' if args.major == 2 else 'api/v2/monitor/health'}",
            timeout=10).read())
        return all(health[c]["status"] == "healthy" for c in ("scheduler", "triggerer"))

    if not args.read:
        wait("the scheduler and the triggerer", args.timeout, healthy)
        api.call("PATCH", f"/dags/{args.dag}", {"is_paused": False})
        body = {"dag_run_id": args.run_id}
        if args.major == 3:
            body["logical_date"] = None
        api.call("POST", f"/dags/{args.dag}/dagRuns", body)

    def finished():
        state = api.call("GET", f"/dags/{args.dag}/dagRuns/{args.run_id}")["state"]
        return state if state in ("success", "failed") else None

    state = wait(f"run {args.run_id} to finish", args.timeout, finished)
    tasks = {}
    listed = api.call("GET", f"/dags/{args.dag}/dagRuns/{args.run_id}/taskInstances")
    for ti in listed["task_instances"]:
        tasks[ti["task_id"]] = {
            "state": ti["state"],
            "try_number": ti["try_number"],
        }
        if args.read:
            tasks[ti["task_id"]]["lines"] = view_lines(
                api, args.dag, args.run_id, ti["task_id"], ti["try_number"]
            )
    json.dump({"state": state, "tasks": tasks}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
