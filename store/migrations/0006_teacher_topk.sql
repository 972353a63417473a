-- The teacher's k most likely tokens at each position of a student answer, with their
-- log-probabilities (top-k forward KL and generalised JSD distillation, training.distill.objective):
-- top_k tokens per position, most likely first; topk_ids little-endian int32 and topk_logprobs
-- little-endian float32, both [tokens * top_k] row-major. 8 bytes per alternative, so 4 + 8k bytes
-- a token with the given token's figure (68 at k = 8). NULL: scored for reverse KL only. Pruned with
-- the rest of the row (training.rl.keep_logprobs_rounds).
ALTER TABLE teacher_logprobs ADD COLUMN top_k INTEGER;
ALTER TABLE teacher_logprobs ADD COLUMN topk_ids BLOB;
ALTER TABLE teacher_logprobs ADD COLUMN topk_logprobs BLOB;
