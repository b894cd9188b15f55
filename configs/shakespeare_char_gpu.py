# Character-level Tiny Shakespeare at GPU size: a 10.6M-parameter model with a 256-character
# context (nanoGPT's shakespeare_char shape). A few minutes on one modern GPU; too slow for a CPU.
#   python data/shakespeare_char/prepare.py && python train.py configs/shakespeare_char_gpu.py
out_dir = "out-shakespeare-char-gpu"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 200
log_interval = 10

batch_size = 64
block_size = 256
gradient_accumulation_steps = 1

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2  # 5000 iterations see the 1M training characters ~80 times: regularise

learning_rate = 1e-3
max_iters = 5000
warmup_iters = 100
min_lr = 1e-4
beta2 = 0.99  # few tokens per iteration: a longer second-moment average is steadier
