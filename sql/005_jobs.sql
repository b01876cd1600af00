-- Tracked timer jobs (stages/jobs.py): each job's info, every run's execution record, and
-- the hourly statistics snapshot. The live state of a job (next run, paused, interval,
-- the running claim) is in Redis; these tables are its record. Each statement may run
-- again without harm.
CREATE TABLE IF NOT EXISTS job_info (
    name          VARCHAR(100) PRIMARY KEY,
    interval_ms   BIGINT       NOT NULL CHECK (interval_ms > 0),
    enabled       BOOLEAN      NOT NULL DEFAULT TRUE,
    status        VARCHAR(20)  NOT NULL DEFAULT 'idle'
                  CHECK (status IN ('idle', 'running', 'succeeded', 'failed')),
    last_run_at   TIMESTAMPTZ,
    next_run_at   TIMESTAMPTZ,
    retries       INTEGER      NOT NULL DEFAULT 0 CHECK (retries >= 0),
    max_retries   INTEGER      NOT NULL CHECK (max_retries >= 0),
    timeout_ms    BIGINT       NOT NULL CHECK (timeout_ms > 0),
    updated_at    TIMESTAMPTZ  NOT NULL DEFAULT NOW()
);
COMMENT ON TABLE job_info IS 'Tracked timer jobs: configuration and last known state';

-- One row per run, written `running` when it starts and finished in place.
CREATE TABLE IF NOT EXISTS job_executions (
    id              UUID         PRIMARY KEY,
    job_name        VARCHAR(100) NOT NULL,
    started_at      TIMESTAMPTZ  NOT NULL,
    ended_at        TIMESTAMPTZ,
    duration_ms     BIGINT       CHECK (duration_ms >= 0),
    processed_count BIGINT       NOT NULL DEFAULT 0 CHECK (processed_count >= 0),
    status          VARCHAR(20)  NOT NULL
                    CHECK (status IN ('running', 'succeeded', 'failed')),
    error           TEXT,
    attempt         INTEGER      NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    manual          BOOLEAN      NOT NULL DEFAULT FALSE
);
COMMENT ON COLUMN job_executions.attempt IS '0 for a scheduled run, N for its Nth retry';
CREATE INDEX IF NOT EXISTS idx_job_exec_job_started ON job_executions (job_name, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_job_exec_ended ON job_executions (ended_at);

-- The statistics snapshot job's table: one row per snapshot period.
CREATE TABLE IF NOT EXISTS stats_snapshots (
    taken_at        TIMESTAMPTZ PRIMARY KEY,
    devices         INTEGER NOT NULL,
    free            INTEGER NOT NULL,
    active          INTEGER NOT NULL,
    allocated_total BIGINT  NOT NULL,
    released_total  BIGINT  NOT NULL,
    expired_total   BIGINT  NOT NULL
);
COMMENT ON TABLE stats_snapshots IS 'Statistics of the live state, one row per snapshot period';
