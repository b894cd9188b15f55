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

# The main job's recipe (Muon, QK-norm, untied head, zero-initialised output projections, a trapezoid
# schedule). Measured only on a 2-core CPU at the main job's size, where it won at equal wall time;
# not measured at this size or on a GPU. Muon's learning rate and momentum are its usual defaults.
qk_norm = True
tie_embeddings = False
zero_init_out_proj = True
optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
learning_rate = 1e-3  # AdamW, for the embedding, head and norms
max_iters = 5000
warmup_iters = 100
lr_schedule = "wsd"
decay_frac = 0.5
min_lr = 1e-4
beta2 = 0.99  # few tokens per iteration: a longer second-moment average is steadier
