-- The group of a task (tasks.groups): the same question in another form shares it ("chain_sum:+1 +5"
-- for "1 + 5" and "5 + 1"; a JSONL task's `group` field). New tasks are split by group, so a group
-- never straddles the held-out wall; NULL: the task is its own group (split by its key, as before).
-- Tasks stored before this column keep their split: moving them would move the wall under stored
-- evaluations.
ALTER TABLE tasks ADD COLUMN task_group TEXT;
CREATE INDEX tasks_group ON tasks(task_group);
