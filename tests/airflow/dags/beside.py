"""The DAG the real-Airflow e2e test runs with localship beside Airflow's
remote logging: a deferrable sensor (its try defers to the triggerer, Airflow
uploads part of its log, and it resumes) and a task that goes quiet for longer
than localship's --settle between two parts of its log."""

import time
from datetime import datetime, timedelta

from airflow import DAG

try:  # Airflow 3: the standard provider.
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor

    def deferrable_wait(task_id):
        return TimeDeltaSensor(task_id=task_id, delta=timedelta(seconds=5), deferrable=True)

except ImportError:  # Airflow 2.10.
    from airflow.operators.python import PythonOperator
    from airflow.sensors.time_delta import TimeDeltaSensorAsync

    def deferrable_wait(task_id):
        return TimeDeltaSensorAsync(task_id=task_id, delta=timedelta(seconds=5))


def quiet():
    print("quiet task: first part")
    for line in range(3):
        print(f"  first part, line {line} without a timestamp of its own")
    time.sleep(8)
    print("quiet task: second part")


with DAG("beside", start_date=datetime(2026, 1, 1), schedule=None, catchup=False) as dag:
    deferrable_wait("wait") >> PythonOperator(task_id="quiet", python_callable=quiet)
