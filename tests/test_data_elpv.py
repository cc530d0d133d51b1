"""The ELPV source: the real package's labels and a fixed stratified split; errors on bad folders."""

import numpy as np
import pytest

from jaxfer import data
from jaxfer.data import elpv
from tests import stand_ins

pytest.importorskip("PIL.Image")


def test_real_elpv_labels_and_split():
    pytest.importorskip(elpv.PACKAGE)
    src = data.make_source("elpv")  # registered in the sources registry
    assert len(src) == 2624 and src.label_names == ("functional", "defective")
    cols = src.columns
    assert int(cols["label"].sum()) == 821  # probability >= 0.5
    assert np.array_equal(cols["label"], (cols["probability"] >= 0.5).astype(np.int32))
    assert sorted(np.unique(np.round(cols["probability"] * 3)).tolist()) == [0, 1, 2, 3]
    assert int((cols["cell_type"] == 0).sum()) == 1074  # mono
    first = src[0]
    assert first["image"].shape == (300, 300) and first["image"].dtype == np.uint8  # greyscale
    train, val, test = data.split_source(src, (0.65, 0.1, 0.25), seed=0)
    assert (len(train), len(val), len(test)) == (1704, 266, 654)
    ids = [set(s.columns["id"].tolist()) for s in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for part in (train, val, test):  # every grade x cell type in the same proportion
        share = np.bincount(part.columns["stratum"], minlength=8) / len(part)
        np.testing.assert_allclose(share, np.bincount(cols["stratum"], minlength=8) / len(src), atol=0.01)
    again = data.split_source(data.read_elpv(), (0.65, 0.1, 0.25), seed=0)[2]
    assert again.paths == test.paths  # fixed
    mono = data.read_elpv(cell_type="mono")
    assert len(mono) == 1074 and set(mono.columns["cell_type"].tolist()) == {0}


def test_threshold_and_errors(tmp_path):
    root = stand_ins.elpv_folder(str(tmp_path / "elpv"), n=16)
    src = data.read_elpv(root, threshold=0.3)
    assert src.columns["label"].tolist() == [int(p >= 0.3) for p in src.columns["probability"]]
    with pytest.raises(ValueError, match="cell_type 'amorphous'"):
        data.read_elpv(root, cell_type="amorphous")
    with pytest.raises(FileNotFoundError, match="no labels.csv"):
        data.read_elpv(str(tmp_path))
    (tmp_path / "elpv" / "images" / "cell0003.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 images named in labels.csv are missing.*cell0003"):
        data.read_elpv(root)
    with open(tmp_path / "elpv" / "labels.csv", "a") as f:
        f.write("images/cell0000.png  1.5  mono\n")
    with pytest.raises(ValueError, match=r"labels.csv:17: defect probability 1.5"):
        data.read_elpv(root)
