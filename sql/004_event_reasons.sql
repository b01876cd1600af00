-- Events from other systems (stage `events`): why an allocation ended, and the statuses
-- events give users. Each statement may run again without harm.

-- device_allocations.end_reason: released (by its user), expired, or the event that
-- ended it (device_failed, user_suspended, ...; schemas.messages.EndReason).
ALTER TABLE device_allocations ADD COLUMN IF NOT EXISTS end_reason VARCHAR(50);
COMMENT ON COLUMN device_allocations.end_reason IS 'Why it ended: released, expired, or the event (device_failed, ...)';
CREATE INDEX IF NOT EXISTS idx_alloc_end_reason ON device_allocations (end_reason)
    WHERE end_reason IS NOT NULL;

-- The ledger keeps the same reason.
ALTER TABLE billing_ledger DROP CONSTRAINT IF EXISTS billing_ledger_end_reason_check;
ALTER TABLE billing_ledger ADD CONSTRAINT billing_ledger_end_reason_check CHECK (end_reason IN (
    'released', 'expired', 'device_failed', 'device_deleted', 'device_maintenance',
    'device_stopped', 'device_error', 'user_deleted', 'user_suspended', 'quota_reduced',
    'quota_exceeded', 'payment_failed', 'billing_overdue'));

-- user.deleted leaves the user's record as 'deleted' (later requests are refused).
ALTER TABLE user_quotas DROP CONSTRAINT IF EXISTS user_quotas_status_check;
ALTER TABLE user_quotas ADD CONSTRAINT user_quotas_status_check
    CHECK (status IN ('active', 'suspended', 'expired', 'overdue', 'deleted'));
