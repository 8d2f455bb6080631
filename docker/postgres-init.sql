-- Run once by the postgres image on an empty data volume: one database per store, because
-- MLflow, Prefect and Optuna each keep their own alembic_version table (esmm/stack.py: STORES).
CREATE DATABASE esmm_mlflow;
CREATE DATABASE esmm_prefect;
CREATE DATABASE esmm_optuna;
