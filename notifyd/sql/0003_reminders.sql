-- Reminders fire from the timer wheel: record how late, and whether the daemon was down.
ALTER TABLE interview_reminders
    ADD COLUMN late          boolean NOT NULL DEFAULT false,
    ADD COLUMN lateness_ms   integer;

-- start-up rebuild of the wheel and the sweeper's overdue check
DROP INDEX reminders_due_idx;
CREATE INDEX reminders_due_idx ON interview_reminders (reminder_time, id) WHERE status = 'scheduled';
