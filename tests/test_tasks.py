"""Task losses, metrics, networks and the TaskOperator wrapper (recon.tasks, recon.models)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recon.models import UNet, resnet_classifier
from recon.tasks import (ClassificationLoss, SegmentationLoss, TaskLoss, TaskOperator,
                         classification_accuracy, classification_cross_entropy, confusion_matrix,
                         dice_per_class, iou_per_class, log_cosh_dice_loss, mean_dice, mean_iou,
                         segmentation_cross_entropy, segmentation_scores, soft_dice_loss,
                         soft_iou_loss, top_k_accuracy)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _onehot_logits(labels, k, scale=50.0):
    return scale * F.one_hot(labels.clamp(0, k - 1), k).permute(0, 3, 1, 2).double()


# ----- losses ------------------------------------------------------------------------------
def test_soft_losses_vanish_on_confident_correct_logits_and_grow_on_wrong_ones():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    good = _onehot_logits(labels, 4)
    bad = _onehot_logits((labels + 1) % 4, 4)
    for fn in (soft_dice_loss, soft_iou_loss, log_cosh_dice_loss, segmentation_cross_entropy):
        assert float(fn(good, labels)) < 1e-6
        assert float(fn(bad, labels)) > 0.4
    assert float(soft_dice_loss(bad, labels)) == pytest.approx(1.0, abs=3e-2)
    assert float(log_cosh_dice_loss(bad, labels)) == pytest.approx(math.log(math.cosh(1.0)), abs=3e-2)


def test_soft_dice_and_iou_hand_computed():
    # two classes, 4 pixels; probabilities p1 = [1, 1, 0, 0.5] with labels [1, 0, 0, 1]
    p1 = torch.tensor([1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    logits = torch.stack([torch.zeros(4, dtype=torch.float64), torch.logit(p1.clamp(1e-12, 1 - 1e-12))])
    logits = logits.reshape(1, 2, 1, 4)
    labels = torch.tensor([[[1, 0, 0, 1]]])
    # class 1: I=1.5, P=2.5, T=2 ; class 0: I=1, P=1.5, T=2 (eps = 0 -> plain ratios)
    d = 1 - 0.5 * (2 * 1.5 / 4.5 + 2 * 1.0 / 3.5)
    j = 1 - 0.5 * (1.5 / 3.0 + 1.0 / 2.5)
    assert float(soft_dice_loss(logits, labels, eps=0.0)) == pytest.approx(d, abs=1e-9)
    assert float(soft_iou_loss(logits, labels, eps=0.0)) == pytest.approx(j, abs=1e-9)


def test_ignore_index_pixels_do_not_count():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (1, 4, 4), generator=g)
    masked = labels.clone()
    masked[..., :2] = 255
    changed = logits.clone()
    changed[..., :2] = 100 * torch.randn(1, 3, 4, 2, dtype=torch.float64)
    for fn in (segmentation_cross_entropy, soft_dice_loss, soft_iou_loss):
        assert float(fn(logits, masked)) == pytest.approx(float(fn(changed, masked)), abs=1e-12)
    all_ignored = torch.full_like(labels, 255)
    assert float(segmentation_cross_entropy(logits, all_ignored)) == 0.0


def test_segmentation_loss_is_the_weighted_sum_and_rejects_unknown_terms():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    total = SegmentationLoss()(logits, labels)
    parts = sum(fn(logits, labels) for fn in (segmentation_cross_entropy, soft_dice_loss,
                                              soft_iou_loss, log_cosh_dice_loss))
    assert float(total) == pytest.approx(float(parts))
    two = SegmentationLoss({"ce": 0.5, "dice": 2.0})(logits, labels)
    assert float(two) == pytest.approx(float(0.5 * segmentation_cross_entropy(logits, labels)
                                             + 2 * soft_dice_loss(logits, labels)))
    with pytest.raises(ValueError, match="focal"):
        SegmentationLoss({"focal": 1.0})
    with pytest.raises(ValueError, match="dice"):
        SegmentationLoss({"dice": -1.0})


def test_bad_labels_and_mismatched_outputs_raise_named_errors():
    logits = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        soft_dice_loss(logits, torch.full((2, 4, 4), 3))
    with pytest.raises(ValueError, match="does not match the labels"):
        segmentation_cross_entropy(logits, torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        soft_iou_loss(logits, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="out of range"):
        classification_cross_entropy(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="does not match the labels"):
        ClassificationLoss()(torch.zeros(2, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="does not match the labels"):    # a segmenter's output vs class labels
        classification_cross_entropy(torch.zeros(2, 5, 4, 4), torch.tensor([0, 1]))


def test_classification_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 7, generator=g)
    s = torch.randint(0, 7, (5,), generator=g)
    assert float(classification_cross_entropy(z, s)) == pytest.approx(float(F.cross_entropy(z, s)))


# ----- metrics -----------------------------------------------------------------------------
def test_dice_iou_from_confusion_match_hand_counts_and_skip_absent_classes():
    target = torch.tensor([[0, 0, 1, 1, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 3, 2]])
    cm = confusion_matrix(pred, target, 4)
    assert int(cm.sum()) == 5                    # the ignored pixel is not counted
    d, j = dice_per_class(cm), iou_per_class(cm)
    # class 0: TP 1, FN 1 ; class 1: TP 2, FP 1 ; class 2: TP 1 ; class 3: absent
    assert d[:3].tolist() == pytest.approx([2 / 3, 4 / 5, 1.0])
    assert j[:3].tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert math.isnan(float(d[3])) and math.isnan(float(j[3]))
    assert mean_dice(pred, target, 4) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert mean_iou(pred, target, 4) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    sc = segmentation_scores(cm)
    assert sc["pixel_accuracy"] == pytest.approx(4 / 5)
    logits = F.one_hot(pred.clamp(max=3), 4).permute(0, 2, 1).float()[..., None]  # (1, 4, 6, 1)
    assert mean_dice(logits, target[..., None], 4) == pytest.approx(sc["mean_dice"])
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix(pred, torch.tensor([[0, 0, 1, 9, 1, 2]]), 4)


def test_iou_matches_scikit_learn_jaccard():
    from sklearn.metrics import f1_score, jaccard_score
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 5, (3, 6, 6), generator=g)
    p = torch.randint(0, 5, (3, 6, 6), generator=g)
    cm = confusion_matrix(p, t, 5)
    ref_j = jaccard_score(t.reshape(-1), p.reshape(-1), average=None, labels=list(range(5)))
    ref_d = f1_score(t.reshape(-1), p.reshape(-1), average=None, labels=list(range(5)))
    np.testing.assert_allclose(iou_per_class(cm).numpy(), ref_j, atol=1e-12)
    np.testing.assert_allclose(dice_per_class(cm).numpy(), ref_d, atol=1e-12)


def test_accuracy_and_top_k():
    z = torch.tensor([[0.0, 1, 2, 3], [3, 2, 1, 0], [0, 3, 1, 2]])
    s = torch.tensor([3, 1, 2])
    assert classification_accuracy(z, s) == pytest.approx(1 / 3)
    assert top_k_accuracy(z, s, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(z, s, 5) == 1.0
    with pytest.raises(ValueError, match="k must"):
        top_k_accuracy(z, s, 0)


# ----- networks ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (128, 128), (64, 128)])
def test_unet_maps_images_to_per_pixel_logits(shape):
    net = UNet(in_channels=3, num_classes=5, base_channels=4, depth=3).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *shape))
    assert out.shape == (2, 5, *shape)
    names = [n for n, _ in net.named_children()]
    assert names == ["inc", "down1", "down2", "down3", "up1", "up2", "up3", "outc"]


def test_unet_rejects_bad_sizes_and_arguments():
    net = UNet(1, 3, base_channels=4, depth=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        UNet(1, 0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_classifier_has_a_new_head(arch):
    net = resnet_classifier(arch, num_classes=7, in_channels=1).eval()
    assert net.fc.out_features == 7 and net.conv1.in_channels == 1
    with torch.no_grad():
        assert net(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    small = resnet_classifier("resnet18", num_classes=3, small_input=True)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    with pytest.raises(ValueError, match="arch"):
        resnet_classifier("vgg16")


def test_resnet_classifier_loads_local_weights_only(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    net = resnet_classifier("resnet18", num_classes=4, weights_path=str(tmp_path / "r18.pt"))
    assert torch.equal(net.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resnet_classifier("resnet18", weights_path=str(tmp_path / "nowhere.pt"))


# ----- TaskOperator ------------------------------------------------------------------------
def test_task_operator_last_k_selects_the_last_up_blocks_and_output_conv():
    net = UNet(1, 3, base_channels=4, depth=3)
    task = TaskOperator(net, last=3)
    assert task.finetune == ["up2", "up3", "outc"]
    assert all(n.split(".")[0] in {"up2", "up3", "outc"} for n in task.trainable_names)
    assert any(n.startswith("inc.") for n in task.frozen_names)
    res = TaskOperator(resnet_classifier("resnet18", num_classes=3), last=2)
    assert res.finetune == ["layer4", "fc"]
    named = TaskOperator(resnet_classifier("resnet50", num_classes=3), finetune=["layer4.2", "fc"])
    assert all(n.startswith(("layer4.2.", "fc.")) for n in named.trainable_names)


def test_task_operator_keeps_frozen_parts_in_eval_mode():
    net = UNet(1, 3, base_channels=4, depth=2)
    task = TaskOperator(net, finetune=["up2", "outc"])
    assert not any(m.training for m in net.modules())          # starts in eval mode
    task.train()
    assert not net.inc[1].training and not net.down1[1][1].training   # frozen batch norms
    assert net.up2.conv[1].training                                # fine-tuned batch norm
    bn = net.inc[1]
    before = bn.running_mean.clone()
    task(torch.rand(2, 1, 16, 16))
    assert torch.equal(bn.running_mean, before)
    task.eval()
    assert not any(m.training for m in net.modules())


def test_task_operator_rejects_bad_selection():
    net = UNet(1, 3, base_channels=4, depth=2)
    with pytest.raises(ValueError, match="nohead"):
        TaskOperator(net, finetune=["nohead"])
    with pytest.raises(ValueError, match="last=9"):
        TaskOperator(net, last=9)
    with pytest.raises(ValueError, match="not both"):
        TaskOperator(net, finetune=["outc"], last=1)
    with pytest.raises(TypeError, match="network"):
        TaskOperator("unet")


def test_task_loss_is_an_outer_loss_with_the_finetuned_parameters():
    net = UNet(1, 3, base_channels=4, depth=2).double()
    outer = TaskLoss(TaskOperator(net, finetune=["outc"]), SegmentationLoss())
    assert set(outer.trainable_parameters()) == {"task.network.outc.weight", "task.network.outc.bias"}
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    loss = outer(x, {}, {"label": torch.randint(0, 3, (2, 16, 16))})
    assert loss.dim() == 0 and float(loss.detach()) > 0
    with pytest.raises(ValueError, match="label"):
        outer(x, {}, {"y": x})
    with pytest.raises(ValueError, match="does not match the labels"):
        outer(x, {}, {"label": torch.randint(0, 3, (2,))})
