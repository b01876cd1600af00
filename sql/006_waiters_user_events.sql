-- Issue 11: what a rebuild needs that was live in Redis only. Each statement may run
-- again without harm.

-- The wait queue's requests (WaiterChange, written behind by persist): one row per
-- request that waited, 'waiting' while it waits, 'left' once it got its final reply
-- (with why). The newest version wins (the joining's time doubled, leaving adds one), so
-- a late or repeated change never brings back a request that left. `request` is all the
-- request needs to wait again; devsched rebuild re-queues the rows still 'waiting'.
CREATE TABLE IF NOT EXISTS waiting_requests (
    user_id      VARCHAR(255) NOT NULL,
    request_id   VARCHAR(255) NOT NULL,
    status       VARCHAR(20)  NOT NULL CHECK (status IN ('waiting', 'left')),
    version      BIGINT       NOT NULL,
    reason       VARCHAR(50),
    queue_score  BIGINT       NOT NULL,
    queued_at    TIMESTAMPTZ  NOT NULL,
    wait_until   TIMESTAMPTZ  NOT NULL,
    request      JSONB        NOT NULL,
    updated_at   TIMESTAMPTZ  NOT NULL DEFAULT NOW(),
    PRIMARY KEY (user_id, request_id)
);
COMMENT ON TABLE waiting_requests IS 'Wait queue requests (write-behind): re-queued by devsched rebuild while waiting';
CREATE INDEX IF NOT EXISTS idx_waiting_requests_waiting ON waiting_requests (queue_score)
    WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS idx_waiting_requests_left ON waiting_requests (wait_until)
    WHERE status = 'left';

-- The parts of a user's status events keep apart (UserEventApplied), the versions of the
-- last user.* and billing.* events applied, and the failed payments counted with the
-- moment that count expires. NULL: no event set it (a quota set by command clears the
-- two status parts, as it does in Redis).
ALTER TABLE user_quotas ADD COLUMN IF NOT EXISTS user_status VARCHAR(50);
ALTER TABLE user_quotas ADD COLUMN IF NOT EXISTS billing_status VARCHAR(50);
ALTER TABLE user_quotas ADD COLUMN IF NOT EXISTS user_event_version BIGINT;
ALTER TABLE user_quotas ADD COLUMN IF NOT EXISTS billing_event_version BIGINT;
ALTER TABLE user_quotas ADD COLUMN IF NOT EXISTS payment_failures INTEGER;
ALTER TABLE user_quotas ADD COLUMN IF NOT EXISTS payment_failures_until TIMESTAMPTZ;
