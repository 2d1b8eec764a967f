"""Masked spectrogram pretraining, on one CPU or under `torchrun` on many GPUs.

    hear-msm pretrain --model ssam_tiny --data AUDIO_OR_SHARDS --out RUN [--steps N --batch-size B]
    torchrun --nproc-per-node=4 -m hear_msm.cli pretrain --model ssam_tiny --data SHARDS --out RUN
    hear-msm pretrain --out RUN --resume          # continue a stopped or killed run
    hear-msm plot-loss RUN                        # RUN/loss.png from RUN/log.csv

Each family pretrains with its authors' recipe by default (`config.RECIPES`; flags override it).
SSAST / SSAM / AxLSTM (Yadav et al., after SSAST): random 2 s crops of per-clip normalised
log-mel; 50% of the 250 patches masked (`unstructured`, or whole 40 ms columns with `timestep`)
and replaced by the mask token, the encoder sees all tokens; MSE against the normalised patch
values over all patches (`masked_only_loss` for the masked ones); AdamW betas (0.9, 0.95), weight
decay 0.05 except biases, norms, positions and the cls/mask tokens; lr = base_lr * batch / 256,
linear warm-up then cosine decay; fp16 autocast + GradScaler on CUDA.
SSAMBA (Shams et al.): 10.24 s crops of Kaldi fbank; 400 of 512 patches masked in clusters;
InfoNCE + 10 x MSE over the masked patches in two masked passes; drop path 0.1; AdamW betas
(0.95, 0.999), weight decay 5e-8, lr 1e-4 at batch 64 after 1000 warm-up steps, constant; fp32.
MW-MAE / MAE (Yadav et al., ICLR 2024; the mwmae_* and mae_* presets): 80% of the patches masked
(50 of 250 kept), the encoder sees the visible ones only, a training-only decoder (384-d, 8 heads,
depth 4; multi-window heads for MW-MAE, global ones for MAE) restores the sequence with mask
tokens and predicts every patch; MSE over the masked patches; AdamW betas (0.9, 0.999), weight
decay 0.05 on every parameter, lr 1.5e-5 x batch / 256, 10 warm-up epochs then cosine.

Training-only decoders (`--decoder`, saved in checkpoint.pt under "decoder", never exported):
`transformer` (`--decoder-depth` blocks before the head), or MW-MAE's decoder behind any SSAST /
SSAM / AxLSTM encoder (`mwmha`, `mae`): the encoder keeps its own masking (mask token in place,
all tokens seen) and the decoder reads its 250 patch tokens and predicts the patches in place of
the model's head, which is frozen and exported as initialised.

DDP is detected from the torchrun environment (WORLD_SIZE > 1): nccl on GPU, gloo on CPU; each
rank reads its own shards (`data.EpochSampler`); only rank 0 logs and writes. A run folder holds
`.hear_msm_run.json` (the marker: `--out` must be new, empty or marked; see `run_folder`),
`.hear_msm_run.lock` (held by the running process), `train_config.json`, `checkpoint.pt` (every
`checkpoint_every` steps and at the end: model, optimizer, scheduler, scaler, step, RNG states,
sampler position), `log.csv` and, when finished, `final/` (config.json + model.safetensors,
loadable with `hear_msm.load_model`). Every file is replaced atomically (`hear_msm._files.atomic_write`).
Every random draw (init, crops, order, masks, drop path) is a function of (seed, step, rank), so a
resumed run ends with the same weights as an uninterrupted one on a deterministic device.

All arguments are checked before training starts (`TrainConfig.__post_init__`, `schedule_steps`):
steps, epochs and batch positive, warm-up non-negative and shorter than the run, min_lr at most
the peak lr, model overrides fields of the architecture's config. A NaN/Inf loss, or non-finite
weights when a checkpoint is due, stops the run with the last (finite) checkpoint untouched and a
`--resume` command to continue it; a resume may change the schedule (`ADJUSTABLE_FIELDS`: lr,
min_lr, warm-up, clipping, precision) and execution settings, nothing else, and each change is
logged, recorded in the marker and named in the model card.

Modules: `config` (TrainConfig, validation, schedule), `data` (audio folders and tar shards ->
crops), `run_folder` (marker and lock), `state` (checkpoint.pt, RNG), `loop` (`train()`: setup ->
step -> log -> checkpoint -> export), `export` (RUN/final, loss plot), `commands` (the CLI).
"""
from .config import TrainConfig
from .loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
