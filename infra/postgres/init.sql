-- Databases and logins of the Prefect server and the MLflow tracking server.
--
-- The postgres image runs this once, as the superuser, when its data volume is empty
-- (psql with ON_ERROR_STOP). Names and passwords come from the container's environment
-- (PREFECT_DB_* and MLFLOW_DB_*, set from infra/.env by docker-compose.yml) through psql's
-- \getenv (psql 15+), so no credential is written in this file. Safe to run again by hand
-- (`psql -f init.sql` with the same variables): existing roles get their password reset,
-- existing databases are left alone.

\set ON_ERROR_STOP on

\getenv prefect_db PREFECT_DB_NAME
\getenv prefect_user PREFECT_DB_USER
\getenv prefect_password PREFECT_DB_PASSWORD
\getenv mlflow_db MLFLOW_DB_NAME
\getenv mlflow_user MLFLOW_DB_USER
\getenv mlflow_password MLFLOW_DB_PASSWORD

-- An unset variable would otherwise leave the literal text ":'prefect_password'" in the SQL.
\if :{?prefect_db}
\else
  DO $$ BEGIN RAISE EXCEPTION 'init.sql: PREFECT_DB_NAME is not set'; END $$;
\endif
\if :{?prefect_user}
\else
  DO $$ BEGIN RAISE EXCEPTION 'init.sql: PREFECT_DB_USER is not set'; END $$;
\endif
\if :{?prefect_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'init.sql: PREFECT_DB_PASSWORD is not set'; END $$;
\endif
\if :{?mlflow_db}
\else
  DO $$ BEGIN RAISE EXCEPTION 'init.sql: MLFLOW_DB_NAME is not set'; END $$;
\endif
\if :{?mlflow_user}
\else
  DO $$ BEGIN RAISE EXCEPTION 'init.sql: MLFLOW_DB_USER is not set'; END $$;
\endif
\if :{?mlflow_password}
\else
  DO $$ BEGIN RAISE EXCEPTION 'init.sql: MLFLOW_DB_PASSWORD is not set'; END $$;
\endif

-- Roles: create when missing, else (re)set the password. \gexec runs the generated statement;
-- format(%I, %L) quotes the identifier and the password literal.
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'prefect_user', :'prefect_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'prefect_user')
UNION ALL
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'prefect_user', :'prefect_password')
WHERE EXISTS (SELECT FROM pg_roles WHERE rolname = :'prefect_user')
\gexec

SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'mlflow_user', :'mlflow_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'mlflow_user')
UNION ALL
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'mlflow_user', :'mlflow_password')
WHERE EXISTS (SELECT FROM pg_roles WHERE rolname = :'mlflow_user')
\gexec

-- Databases (CREATE DATABASE cannot run inside a DO block or a transaction, hence \gexec).
-- Each is owned by its own login, so the servers can run their schema migrations.
SELECT format('CREATE DATABASE %I OWNER %I', :'prefect_db', :'prefect_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'prefect_db')
\gexec

SELECT format('CREATE DATABASE %I OWNER %I', :'mlflow_db', :'mlflow_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'mlflow_db')
\gexec

-- Neither login may connect to the other's database.
SELECT format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', :'prefect_db')
\gexec
SELECT format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', :'mlflow_db')
\gexec
