# Step 2 of the chat fine-tuning demo (docs/chat.md): fine-tune the pretrained model of
# configs/reverse_pretrain.py on the reversal conversations, the loss on the assistant's replies only.
#   python data/chat/prepare.py --input data/reverse/train.jsonl --tokenizer data/reverse/tokenizer \
#       --out_dir data/reverse/chat
#   python train.py configs/reverse_chat.py
#   python eval.py --out_dir=out-reverse-chat --tasks=data/reverse/test.jsonl   # held-out exact match
init_from = "out-reverse-pretrain"
out_dir = "out-reverse-chat"
data_dir = "data/reverse/chat"
eval_interval = 50
eval_iters = 10
log_interval = 25
always_save_checkpoint = True  # the last iteration is the one to keep: val loss is on few tokens

batch_size = 16  # rows of 128 tokens, each packed with ~4 conversations
block_size = 128
gradient_accumulation_steps = 1

optimizer = "muon"  # the pretraining recipe, at its learning rates
muon_lr = 0.02
muon_momentum = 0.85
muon_ns_steps = 4
learning_rate = 3e-3
max_iters = 150
warmup_iters = 10
lr_schedule = "wsd"
decay_frac = 0.5
min_lr = 1e-4
beta2 = 0.99
