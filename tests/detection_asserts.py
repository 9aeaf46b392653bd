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
