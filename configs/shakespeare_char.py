# The README's main job: a small character-level model of Tiny Shakespeare that trains in a few
# minutes on a 2-core CPU in float32 (and in seconds on a GPU) to a val loss of about 1.63.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 50

batch_size = 16  # small batches, more steps: better for a fixed CPU budget
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too few iterations to overfit

learning_rate = 3e-3  # a small model takes a high learning rate
max_iters = 1000  # ~2M tokens: ~2.5 minutes at ~15k tokens/s on 2 idle cores
warmup_iters = 50
min_lr = 1e-4
beta2 = 0.99  # few tokens per iteration: a longer second-moment average is steadier
