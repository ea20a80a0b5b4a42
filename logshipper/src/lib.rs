//! Ships finished Airflow task logs.
