# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 1: the intuition behind batch normalization, measured
#
# Section 1 of the article makes four claims for batch normalization (BN):
#
# 1. *Stabilizes training*: keeps activations well-scaled, avoiding extreme values.
# 2. *Speeds up convergence*: reduces the need for careful initialization and learning-rate tuning.
# 3. *Regularization effect*: the noise of batch statistics acts as a mild regularizer.
# 4. *Accurate running statistics* help the model at inference.
#
# Claims are cheap; this lesson measures them on one small, fully seeded setting and prints
# what comes out, whichever way it comes out.  The setting (`minibn/figures/s1_intuition.py`):
#
# * data: 16-dimensional Gaussian inputs, 4 classes given by a fixed random teacher network
#   (`minibn.experiments.make_classification`), 1024 training and 2048 test samples;
# * model: 8 hidden layers of width 64, `Linear -> [BatchNorm1d] -> ReLU`, then a `Linear`
#   to the 4 logits, trained with minibn's own layers and hand-written backward;
# * plain SGD, batch 64, learning rate 0.1, 20 epochs, float64;
# * two initializations: minibn's (= PyTorch's) default `Linear` init, uniform with
#   std = 1/sqrt(3 fan_in) ("gain" 0.577), and He init, Gaussian with std = sqrt(2/fan_in).
#
# Each result is one seed unless said otherwise: read differences of a point or two of accuracy
# as noise.  Figures: `s1_activation_stats`, `s1_training_curves`, `s1_init_lr_sweep`.

# %%
import math

import numpy as np

from minibn.experiments import evaluate
from minibn.figures import s1_intuition as s1, show
from minibn.nn import BatchNorm1d

KEYS = {"plain, default init": "plain_default", "BN, default init": "bn_default",
        "plain, He init": "plain_he", "BN, He init": "bn_he"}


def fmt(values, d=4):
    """A list of numbers as ``[a b c]`` with ``d`` decimals (``nan`` for a missing value)."""
    return "[" + " ".join("nan" if v is None else f"{v:.{d}f}" for v in values) + "]"


data = s1.dataset()
counts = np.bincount(data.y_test, minlength=4)
print(f"n_train = {data.x_train.shape[0]}")
print(f"n_test = {data.x_test.shape[0]}")
print(f"test_class_counts = {fmt(counts, 0)}")
print(f"majority_class_accuracy = max(counts) / n_test = {counts.max() / counts.sum():.6f}"
      "    # what a model that ignores its input scores")
print(f"chance_loss = ln(4) = {math.log(4):.6f}    # cross-entropy of a uniform guess")

# %% [markdown]
# ## 1. Activations: are they "well-scaled and centered"?
#
# For a probe batch of 512 training samples we record the mean and the standard deviation of
# every hidden layer's ReLU output (what the next layer receives), in training mode, before
# training (epoch 0) and after epochs 1, 5 and 20.
#
# A reference point: if BN's output is exactly standard normal, ReLU of it has
#
#     mean = 1/sqrt(2 pi),   std = sqrt(1/2 - 1/(2 pi))
#
# (gamma = 1 and beta = 0 at the start; training moves them).

# %%
relu_mean = 1 / math.sqrt(2 * math.pi)
relu_std = math.sqrt(0.5 - 1 / (2 * math.pi))
print(f"relu_of_normal_mean = 1/sqrt(2 pi) = {relu_mean:.6f}")
print(f"relu_of_normal_std = sqrt(1/2 - 1/(2 pi)) = {relu_std:.6f}")

act = s1.activation_stats_data()
for name, c in act["configs"].items():
    print(f"\n{name}: ReLU output per hidden layer 1..8")
    for i, e in enumerate(act["epochs"]):
        print(f"act_mean {KEYS[name]} e{e} = {fmt(c['mean'][i])}")
        print(f"act_std {KEYS[name]} e{e} = {fmt(c['std'][i])}")

# %%
pd, bd = act["configs"]["plain, default init"], act["configs"]["BN, default init"]
shrink = pd["std"][0][0] / pd["std"][0][-1]
print(f"plain_default_std_ratio_layer1_to_layer8 = {pd['std'][0][0]:.4f} / {pd['std'][0][-1]:.4f} "
      f"= {shrink:.2f}")
# With the weights' contribution gone, a layer's pre-activation is about its bias alone:
# uniform in [-1/sqrt(64), 1/sqrt(64)], std 1/sqrt(3 * 64); ReLU keeps relu_std of that.
bias_floor = relu_std / math.sqrt(3 * 64)
print(f"bias_floor_std = sqrt(1/2 - 1/(2 pi)) / sqrt(3 * 64) = {bias_floor:.4f}"
      "    # ReLU output std when only the bias is left")
bn_all = [s for row in bd["std"] for s in row]
print(f"bn_default_std_range = [{min(bn_all):.4f} {max(bn_all):.4f}]    # all layers, all epochs")
ph = act["configs"]["plain, He init"]["std"]
print()
print(f"What this shows: without BN, the default init shrinks the ReLU outputs' std "
      f"{shrink:.1f}x from layer 1 to layer 8 at the start; the deep layers sit near "
      f"{bias_floor:.3f}, the std their biases alone would give, so their input carries little.  "
      f"After 20 epochs the layer-8 std is {pd['std'][-1][-1]:.4f}.  With BN every layer's ReLU "
      f"output has std between {min(bn_all):.2f} and {max(bn_all):.2f} at every checkpoint, near the "
      f"{relu_std:.2f} of a ReLU of a standard normal.  With He init the plain network starts well "
      f"scaled too (layer-8 std {ph[0][-1]:.2f}), and training moves it to {ph[-1][-1]:.2f}.")
show("s1_activation_stats")

# %% [markdown]
# ## 2. Training curves: does BN "speed up convergence"?
#
# Mean training loss per epoch, and accuracy (eval mode: BN uses its running statistics) on the
# training and test sets.

# %%
curves = s1.training_curves_data()
for name, c in curves["configs"].items():
    k = KEYS[name]
    print(f"\n{name}")
    print(f"loss {k} = {fmt(c['train_loss'])}")
    print(f"train_acc {k} = {fmt(c['train_acc'])}")
    print(f"test_acc {k} = {fmt(c['test_acc'])}")


def first_epoch_below(losses, level):
    return next((i + 1 for i, v in enumerate(losses) if v < level), None)


print()
for name, c in curves["configs"].items():
    ep = first_epoch_below(c["train_loss"], 0.5)
    print(f"epochs_to_loss_below_0.5 {KEYS[name]} = {'nan' if ep is None else ep}")
cf = curves["configs"]
pdl, bdl = cf["plain, default init"], cf["BN, default init"]
e_bn = first_epoch_below(cf["BN, He init"]["train_loss"], 0.5)
e_plain = first_epoch_below(cf["plain, He init"]["train_loss"], 0.5)
print()
learns = "does not learn in 20 epochs" if pdl["train_loss"][-1] > 1.2 else "learns slowly"
print(f"What this shows: with the default init the plain network {learns} (loss "
      f"{pdl['train_loss'][-1]:.3f}; test accuracy {pdl['test_acc'][-1]:.3f}, the majority class "
      f"scores {counts.max() / counts.sum():.3f}), while the same network with BN reaches loss "
      f"{bdl['train_loss'][-1]:.3f} and test accuracy {bdl['test_acc'][-1]:.3f}.  With He init, BN "
      f"gets the loss below 0.5 after {e_bn} epochs, the plain network after {e_plain}.  So in "
      f"this setting BN removes the need for a careful init, and "
      + ("with a careful init it still takes fewer epochs" if e_bn and e_plain and e_bn < e_plain
         else "with a careful init it is not faster in epochs")
      + " (an epoch with BN costs more compute: 8 more layers forward and backward).")
show("s1_training_curves")

# %% [markdown]
# ## 3. Sensitivity to the initialization scale and to the learning rate
#
# Weights ~ N(0, gain^2 / fan_in), biases 0; gain = sqrt(2) is He init.  For a ReLU network
# without normalization each layer multiplies the activations' scale by about gain/sqrt(2), so
# over 8 layers a gain of 1 shrinks them by 2^4 = 16 and a gain of 2 grows them by 16.  BN
# divides the scale out at every layer (the last Linear still sees it).  Training loss after 10
# epochs; `nan` = the run blew up (a batch loss above 1e6, or overflowing: diverged).

# %%
sweep = s1.init_lr_sweep_data()
print(f"gains = {fmt(sweep['gains'], 4)}")
for label in ("plain", "BN"):
    print(f"gain_sweep_loss {label} = {fmt(sweep['gain_sweep'][label]['final_train_loss'])}")
    print(f"gain_sweep_test_acc {label} = {fmt(sweep['gain_sweep'][label]['test_acc'])}")
print(f"lrs = {fmt(sweep['lrs'], 2)}")
for label in ("plain", "BN"):
    print(f"lr_sweep_loss {label} = {fmt(sweep['lr_sweep'][label]['final_train_loss'])}")
    print(f"lr_sweep_test_acc {label} = {fmt(sweep['lr_sweep'][label]['test_acc'])}")


def trained(values, level=1.0):
    """Settings whose loss got below ``level`` (chance is ln 4 = 1.386)."""
    return [v is not None and v < level for v in values]


print()
for key, xs, what in (("gain_sweep", sweep["gains"], "gains"), ("lr_sweep", sweep["lrs"], "lrs")):
    for label in ("plain", "BN"):
        ok = trained(sweep[key][label]["final_train_loss"])
        print(f"{what}_reaching_loss_below_1 {label} = {fmt([x for x, o in zip(xs, ok) if o], 2)}")
gp, gb = sweep["gain_sweep"]["plain"], sweep["gain_sweep"]["BN"]
lp, lb = sweep["lr_sweep"]["plain"], sweep["lr_sweep"]["BN"]


def describe(xs, losses):
    """Which settings trained, stalled (loss >= 1) or diverged (overflow)."""
    ok = [round(x, 2) for x, v in zip(xs, losses) if v is not None and v < 1.0]
    stalled = [round(x, 2) for x, v in zip(xs, losses) if v is not None and v >= 1.0]
    diverged = [round(x, 2) for x, v in zip(xs, losses) if v is None]
    return f"trained {ok}, stalled {stalled}, diverged {diverged}"


print()
print(f"gain sweep, plain: {describe(sweep['gains'], gp['final_train_loss'])}")
print(f"gain sweep, BN:    {describe(sweep['gains'], gb['final_train_loss'])}")
print(f"lr sweep, plain:   {describe(sweep['lrs'], lp['final_train_loss'])}")
print(f"lr sweep, BN:      {describe(sweep['lrs'], lb['final_train_loss'])}")
bn_losses = [v for v in gb["final_train_loss"] if v is not None]
print()
print(f"What this shows: BN trains over a wider range of initial scales and learning rates than "
      f"the plain network (see the lists above), though not equally fast everywhere: over the "
      f"gains its loss after 10 epochs goes from {min(bn_losses):.3f} to {max(bn_losses):.3f} (a "
      f"larger weight norm before BN means a smaller effective step), and at the smallest "
      f"learning rate it is "
      + ("slower" if (lb["final_train_loss"][0] or 9) > (lp["final_train_loss"][0] or 9) else "faster")
      + f" than the plain network (loss {lb['final_train_loss'][0]:.3f} vs "
      f"{lp['final_train_loss'][0]:.3f}).  BN widens the range of workable settings; it does not "
      f"make every setting faster.")
show("s1_init_lr_sweep")

# %% [markdown]
# ## 4. Is there a "regularization effect"?
#
# If BN regularized, it would narrow the gap between training and test accuracy.  We train the
# He-init network with and without BN from three seeds (initial weights and batch order change;
# the data stay the same) and compare the gap after 20 epochs.

# %%
gen = s1.generalization_data()
for name, c in gen["configs"].items():
    k = KEYS[name]
    print(f"final_train_acc {k} = {fmt(c['train_acc'])}")
    print(f"final_test_acc {k} = {fmt(c['test_acc'])}")
    print(f"gap {k} = train - test = {fmt(c['gap'])}")
    print(f"mean_gap {k} = {np.mean(c['gap']):.4f}")
    print(f"mean_test_acc {k} = {np.mean(c['test_acc']):.4f}")
gap_plain = np.mean(gen["configs"]["plain, He init"]["gap"])
gap_bn = np.mean(gen["configs"]["BN, He init"]["gap"])
print()
if gap_bn < gap_plain:
    print(f"What this shows: BN's mean train-test gap ({gap_bn:.3f}) is smaller than the plain "
          f"network's ({gap_plain:.3f}), consistent with a regularization effect in this setting.")
else:
    print(f"What this shows: no regularization effect here.  BN's mean train-test gap "
          f"({gap_bn:.3f}) is larger than the plain network's ({gap_plain:.3f}), and its mean test "
          f"accuracy is lower ({np.mean(gen['configs']['BN, He init']['test_acc']):.3f} vs "
          f"{np.mean(gen['configs']['plain, He init']['test_acc']):.3f}): BN fits the 1024 training "
          f"samples faster and overfits more.  The noise of batch statistics (batch 64) is real but "
          f"small; the claim may hold elsewhere (larger models, other data, with data augmentation) "
          f"and is not supported by this measurement.")

# %% [markdown]
# ## 5. Running statistics at inference
#
# After training, the BN network (He init, seed 0) is evaluated on the test set three ways:
# with its running statistics (eval mode, the normal way); with the statistics of each test
# mini-batch of 64 (training-mode forward, running statistics restored afterwards); and with
# the running statistics reset to their initial values (mean 0, variance 1).

# %%
model = s1.trained_model("BN, He init")
state = model.state_dict()
acc_running = evaluate(model, data.x_test, data.y_test)
model.train()
pred = np.concatenate([np.argmax(model(data.x_test[i:i + 64]), axis=1)
                       for i in range(0, data.x_test.shape[0], 64)])
acc_batch = float(np.mean(pred == data.y_test))
model.load_state_dict(state)
for m in model.modules():
    if isinstance(m, BatchNorm1d):
        m.reset_running_stats()
acc_reset = evaluate(model, data.x_test, data.y_test)
model.load_state_dict(state)
print(f"test_acc_running_stats = {acc_running:.6f}")
print(f"test_acc_batch_stats_64 = {acc_batch:.6f}")
print(f"test_acc_reset_running_stats = {acc_reset:.6f}")
print()
print(f"What this shows: the running statistics are what make the trained network usable one "
      f"sample at a time: with them the test accuracy is {acc_running:.3f}; normalizing with the "
      f"statistics of test batches of 64 gives {acc_batch:.3f} (it works, but each prediction then "
      f"depends on the other samples in the batch); with the untrained running statistics (0, 1) "
      f"it falls to {acc_reset:.3f}.  Lesson 3 follows the running statistics step by step.")
