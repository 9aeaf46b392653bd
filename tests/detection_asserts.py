"""Assertions shared by the detector tests (imported by name: pytest puts tests/ on sys.path)."""

import torch


def assert_same_detections(expected, actual, limit):
    """Detections equal to torchvision's: counts and labels exact, boxes to 1e-3 px, scores to 1e-4. torchvision does
    not define the order of exactly tied scores (its large-input batched_nms ends with an unstable sort), so rows of
    equal score are compared as sets; a tie group cut by the detection limit is compared by score only."""
    assert len(expected) == len(actual)
    for image, (e, a) in enumerate(zip(expected, actual)):
        n = len(e["scores"])
        assert len(a["scores"]) == n, f"image {image}: {len(a['scores'])} detections, torchvision {n}"
        assert n > 20, "the comparison needs many detections"
        torch.testing.assert_close(a["scores"], e["scores"], atol=1e-4, rtol=0)
        start = 0
        while start < n:
            stop = start + 1
            while stop < n and e["scores"][stop] == e["scores"][start]:
                stop += 1
            if not (stop == n == limit and stop - start > 1):
                rows_e = sorted(zip(e["labels"][start:stop].tolist(), e["boxes"][start:stop].tolist()))
                rows_a = sorted(zip(a["labels"][start:stop].tolist(), a["boxes"][start:stop].tolist()))
                assert [r[0] for r in rows_a] == [r[0] for r in rows_e], f"image {image}, rows {start}:{stop}"
                torch.testing.assert_close(torch.tensor([r[1] for r in rows_a]), torch.tensor([r[1] for r in rows_e]),
                                           atol=1e-3, rtol=0)
            start = stop


def random_boxes(n: int, height: int, width: int, generator=None) -> torch.Tensor:
    """``n`` random xyxy boxes of at least 4 px inside a ``height`` x ``width`` image."""
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
    wh = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.4, height * 0.4]) + 4
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([float(width), float(height)]))], dim=1)


def make_targets(sizes, counts, num_classes, generator=None, first_label=0):
    """Targets of ``counts[i]`` random boxes for images of ``sizes[i]``, labels in ``[first_label, num_classes)``."""
    return [{"boxes": random_boxes(n, h, w, generator),
             "labels": torch.randint(first_label, num_classes, (n,), generator=generator)}
            for (h, w), n in zip(sizes, counts)]


def assert_losses_and_gradients_match(ours, theirs, images, targets, parameter_names, grad_atol):
    """Training losses (torchvision's keys) equal to torchvision's, and after backward the named parameters' gradients
    too."""
    expected, actual = theirs(images, targets), ours(images, targets)
    assert set(actual) == set(expected) == {"classification", "bbox_regression"}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    sum(expected.values()).backward()
    sum(actual.values()).backward()
    for name in parameter_names:
        torch.testing.assert_close(ours.get_parameter(name).grad, theirs.get_parameter(name).grad, rtol=1e-4,
                                   atol=grad_atol)


def two_images_and_targets(seed=0, size=128):
    """Two random images (``size`` x ``size`` and 96 x ``size``) and their targets: three boxes of labels 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g), torch.rand(3, 96, size, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [60.0, 50.0, 120.0, 110.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[20.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]
    return images, targets


def sgd_training_losses(model, images, targets, steps, loss_names, lr=0.01, after_backward=None):
    """Trains ``model`` (set to train mode) for ``steps`` SGD steps on one batch and returns each step's total loss;
    every step must return exactly the losses ``loss_names``. ``after_backward(step)``, if given, runs between the
    backward pass and the optimiser step (to inspect gradients)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    totals = []
    for step in range(steps):
        losses = model(images, targets=targets)
        assert set(losses) == set(loss_names), sorted(losses)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        if after_backward is not None:
            after_backward(step)
        optimizer.step()
        totals.append(float(total.detach()))
    return totals


def detect_trimmed_and_fixed(model, images, head, monkeypatch):
    """``model.detect(images)`` twice: as eager CPU inference runs it (padding slots trimmed before the heads) and on
    the fixed-size path CUDA and torch.compile take (forced by declaring value-dependent shapes unaffordable). Returns
    ``(trimmed, fixed, rows)``, ``rows`` the batch sizes ``head`` saw in the two calls."""
    from fastdet.models import postprocess

    rows = []
    hook = head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        trimmed = model.detect(images)
        with monkeypatch.context() as patch:
            patch.setattr(postprocess, "_value_dependent_shapes_are_free", lambda t: False)
            fixed = model.detect(images)
    hook.remove()
    return trimmed, fixed, rows
