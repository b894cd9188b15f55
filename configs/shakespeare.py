# Tiny Shakespeare with GPT-2's BPE tokenizer, a small model trained from scratch (no pretrained
# weights). Meant for a GPU: the 50304-row embedding (19M) dominates the 30M parameters and the cost.
# The training split is only ~300k tokens, so the model soon overfits: dropout is high and the
# checkpoint keeps the best val loss, not the last.
#   python data/shakespeare/prepare.py && python train.py configs/shakespeare.py
out_dir = "out-shakespeare"
dataset = "shakespeare"
eval_interval = 100
eval_iters = 40
log_interval = 10

batch_size = 16
block_size = 256
gradient_accumulation_steps = 1

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 6e-4
max_iters = 1500
warmup_iters = 100
min_lr = 6e-5
beta2 = 0.99
