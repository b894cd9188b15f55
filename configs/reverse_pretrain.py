# Step 1 of the chat fine-tuning demo (docs/chat.md): a small model pretrained briefly on Tiny Shakespeare
# in the BPE vocabulary of data/reverse/prepare.py, which has ChatML's special tokens.
#   python data/reverse/prepare.py && python train.py configs/reverse_pretrain.py
out_dir = "out-reverse-pretrain"
data_dir = "data/reverse/text"
eval_interval = 100
eval_iters = 20
log_interval = 50

batch_size = 16
block_size = 128
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
qk_norm = True  # exports as Qwen3, whose template (ChatML) the vocabulary carries
tie_embeddings = False
zero_init_out_proj = True

optimizer = "muon"  # the main job's recipe (configs/shakespeare_char.py)
muon_lr = 0.02
muon_momentum = 0.85
muon_ns_steps = 4
learning_rate = 3e-3
max_iters = 300
warmup_iters = 20
lr_schedule = "wsd"
decay_frac = 0.5
min_lr = 1e-4
beta2 = 0.99
