"""Channel maps come from evidence (load_data, explicit map, Phenix index, named source) or warn loudly."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from dinocell.data import channels
from dinocell.data.channels import dyes_to_stains, parse_phenix_index, resolve_channel_map, source_named_by
from dinocell.errors import DataError

REAL = Path(__file__).resolve().parents[2] / "../shared/data/jump_cpg0000_BR00117006"
SOURCE_4 = {1: "Mito", 2: "AGP", 3: "RNA", 4: "ER", 5: "DNA",
            6: "Brightfield_1", 7: "Brightfield_2", 8: "Brightfield_3"}

# Harmony 7 layout: names live in the *last* Map; the first holds flat-field profiles (names only inside text).
INDEX_V7 = """<?xml version="1.0" encoding="utf-8"?>
<EvaluationInputData xmlns:xsd="http://www.w3.org/2001/XMLSchema" Version="2"
    xmlns="43B2A954-E3C3-47E1-B392-6635266B0DD3/HarmonyV7">
  <User>u</User><InstrumentType>Phenix</InstrumentType>
  <Plates><Plate><PlateID>BR00000001</PlateID><PlateRows>16</PlateRows><PlateColumns>24</PlateColumns>
    <Well id="0101" /></Plate></Plates>
  <Maps>
    <Map>
      <Entry ChannelID="1"><FlatfieldProfile>{Channel: 1, ChannelName: Alexa 647}</FlatfieldProfile></Entry>
      <Entry ChannelID="2"><FlatfieldProfile>{Channel: 2, ChannelName: Alexa 568}</FlatfieldProfile></Entry>
    </Map>
    <Map>
      <Entry ChannelID="1"><ChannelName>Alexa 647</ChannelName><ImageSizeX>1080</ImageSizeX></Entry>
      <Entry ChannelID="2"><ChannelName>Alexa 568</ChannelName><ImageSizeX>1080</ImageSizeX></Entry>
      <Entry ChannelID="3"><ChannelName>Alexa 488 Em 650</ChannelName></Entry>
      <Entry ChannelID="4"><ChannelName>Alexa 488</ChannelName></Entry>
      <Entry ChannelID="5"><ChannelName>HOECHST 33342</ChannelName></Entry>
      <Entry ChannelID="6"><ChannelName>Brightfield</ChannelName></Entry>
    </Map>
  </Maps>
  <Images><Image Version="1"><id>0101K1F1P1R1</id><URL>r01c01f01p01-ch1sk1fk1fl1.tiff</URL></Image></Images>
</EvaluationInputData>
"""

# Harmony 5 layout: the Maps hold only flat-field profiles; each Image record names its channel.
INDEX_V5 = """<?xml version="1.0" encoding="utf-8"?>
<EvaluationInputData Version="1" xmlns="http://www.perkinelmer.com/PEHH/HarmonyV5">
  <Maps><Map><Entry ChannelID="1"><FlatfieldProfile>{Channel: 1}</FlatfieldProfile></Entry></Map></Maps>
  <Images>
    <Image Version="1"><id>0101K1F1P1R1</id><URL>r01c01f01p01-ch1sk1fk1fl1.tiff</URL><ChannelID>1</ChannelID>
      <ChannelName>HOECHST 33342</ChannelName></Image>
    <Image Version="1"><id>0101K1F1P1R2</id><URL>r01c01f01p01-ch2sk1fk1fl1.tiff</URL><ChannelID>2</ChannelID>
      <ChannelName>488 long</ChannelName></Image>
    <Image Version="1"><id>0101K1F2P1R1</id><URL>r01c01f02p01-ch1sk1fk1fl1.tiff</URL><ChannelID>1</ChannelID>
      <ChannelName>HOECHST 33342</ChannelName></Image>
  </Images>
</EvaluationInputData>
"""


@pytest.fixture(autouse=True)
def _fresh_warning_state():
    channels._warned.clear()
    yield
    channels._warned.clear()


def test_parse_index_versions(tmp_path: Path) -> None:
    assert parse_phenix_index(INDEX_V7.encode()) == {1: "Alexa 647", 2: "Alexa 568", 3: "Alexa 488 Em 650",
                                                     4: "Alexa 488", 5: "HOECHST 33342", 6: "Brightfield"}
    (tmp_path / "Index.idx.xml").write_text(INDEX_V5)
    assert parse_phenix_index(tmp_path / "Index.idx.xml") == {1: "HOECHST 33342", 2: "488 long"}
    assert dyes_to_stains(parse_phenix_index(INDEX_V7.encode())) == {
        1: "Mito", 2: "AGP", 3: "RNA", 4: "ER", 5: "DNA", 6: "Brightfield"}
    assert dyes_to_stains({7: "405ex, 570-630-em)"}) == {7: "405ex_570_630_em"}
    with pytest.raises(DataError, match="cannot read Phenix index"):
        parse_phenix_index(b"<EvaluationInputData><Maps>")
    with pytest.raises(DataError, match="names no channels"):
        parse_phenix_index(b"<EvaluationInputData/>")


def test_load_data_wins_then_explicit_map(tmp_path: Path) -> None:
    (tmp_path / "Index.idx.xml").write_text(INDEX_V7)
    df = pd.DataFrame({"FileName_OrigDNA": ["r01c01f01p01-ch1sk1fk1fl1.tiff"],
                       "FileName_OrigRNA": ["r01c01f01p01-ch9sk1fk1fl1.tiff"]})
    assert resolve_channel_map(tmp_path, "source_4", {1: "X"}, df) == ({1: "DNA", 9: "RNA"}, "load_data")
    assert resolve_channel_map(tmp_path, "source_4", {"1": "Mito", 2: "AGP"}) == ({1: "Mito", 2: "AGP"},
                                                                                "channel_map")


def test_phenix_index_in_folder_or_images_subfolder(tmp_path: Path) -> None:
    images = tmp_path / "BR1__2021-01-01T00_00_00-Measurement1" / "Images"
    images.mkdir(parents=True)
    (images / "Index.xml").write_text(INDEX_V7)
    for folder in (images, images.parent):
        cmap, origin = resolve_channel_map(folder)
        assert origin == "phenix_index" and cmap[5] == "DNA" and cmap[1] == "Mito"
    cmap, origin = resolve_channel_map([str(images / "r01c01f01p01-ch1sk1fk1fl1.tiff")])
    assert origin == "phenix_index"


def test_source_named_by_path_or_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = "s3://cellpainting-gallery/cpg0016-jump/source_4/images/2021_08_23_Batch12/images/"
    assert source_named_by([uri]) == "source_4"
    assert source_named_by(["/data/resource_4/x"]) is None
    with caplog.at_level(logging.WARNING):
        assert resolve_channel_map(uri) == (SOURCE_4, "source_map")
        assert resolve_channel_map(tmp_path, "cpg0000") == (SOURCE_4, "source_map")
    assert not caplog.records
    with pytest.raises(DataError, match="no built-in channel map for 'source_2'.*data.channel_map"):
        resolve_channel_map("s3://cellpainting-gallery/cpg0016-jump/source_2/images/")


def test_real_folder_is_assumed_with_one_loud_warning(caplog: pytest.LogCaptureFixture) -> None:
    if not REAL.exists():
        pytest.skip("../shared fixture data not present")
    with caplog.at_level(logging.WARNING, logger="dinocell.data.channels"):
        assert resolve_channel_map(REAL) == (SOURCE_4, "assumed")
        assert resolve_channel_map(sorted(str(p) for p in REAL.glob("*.tiff"))) == (SOURCE_4, "assumed")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    for needle in ("source_4", "ch1 Mito", "data.channel_map=<source>", "data.channel_map=", "data.load_data",
                   "refuse"):
        assert needle in warnings[0]


def test_config_channel_map_keys_are_ints() -> None:
    from dinocell.config import load_config

    cfg = load_config(None, ["data.channel_map={1: Mito, 2: AGP}"])
    assert cfg.data.channel_map == {1: "Mito", 2: "AGP"} and cfg.data.source_map is None
    assert load_config(None, ["data.source_map=source_4"]).data.source_map == "source_4"


def test_refusing_commands_get_one_line_with_the_three_fixes(tmp_path: Path) -> None:
    (tmp_path / "r01c01f01p01-ch1sk1fk1fl1.tiff").write_bytes(b"")
    with channels.refuse_assumed_channel_map("dinocell pretrain"):
        with pytest.raises(DataError) as info:
            resolve_channel_map(tmp_path)
        # evidence still resolves inside the block
        assert resolve_channel_map(tmp_path, channel_map_cfg="source_4") == (SOURCE_4, "channel_map")
        assert resolve_channel_map(tmp_path, "source_4")[1] == "source_map"
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("dinocell pretrain:") and str(tmp_path) in msg
    for needle in ("data.channel_map='{1: Mito", "data.load_data=", "data.channel_map=source_4"):
        assert needle in msg
    assert resolve_channel_map(tmp_path)[1] == "assumed"  # outside the block: the guess, with its warning


def test_load_data_table_in_the_folder_is_evidence(tmp_path: Path) -> None:
    from dinocell.data.synthetic import write_jump_folder

    write_jump_folder(tmp_path, n_fields=1, size=32, n_plates=1, wells_per_plate=4, sites_per_well=1)
    with channels.refuse_assumed_channel_map("dinocell embed"):
        cmap, origin = resolve_channel_map(tmp_path)
    assert origin == "load_data" and cmap[5] == "DNA" and cmap[1] == "Mito"
    (tmp_path / "load_data.csv").write_text("not,a,load_data\n1,2,3\n")  # junk: ignored, not trusted
    assert resolve_channel_map(tmp_path)[1] == "assumed"


@pytest.mark.parametrize("bad, message", [
    ("source_99", "neither a map"), ({0: "DNA"}, "channel number >= 1"), ({"x": "DNA"}, "channel number >= 1"),
    ({1: " "}, "channel number >= 1"), ({1: "DNA", 2: "DNA"}, "DNA for more than one channel"),
])
def test_explicit_channel_map_is_checked(tmp_path: Path, bad: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        resolve_channel_map(tmp_path, channel_map_cfg=bad)  # type: ignore[arg-type]


def test_config_accepts_a_source_name_as_channel_map() -> None:
    from dinocell.config import load_config

    assert load_config(None, ["data.channel_map=source_4"]).data.channel_map == "source_4"


def test_channel_map_record(tmp_path: Path) -> None:
    from types import SimpleNamespace

    rec = channels.channel_map_record(SimpleNamespace(channel_map={5: "DNA", 1: "Mito"},
                                                      channel_map_origin="channel_map", channels=["DNA"]))
    assert rec == {"channel_map": {"1": "Mito", "5": "DNA"}, "channel_map_origin": "channel_map", "channels": ["DNA"]}
    synthetic = channels.channel_map_record(SimpleNamespace(channels=["DNA", "RNA"]))
    assert synthetic["channel_map"] is None and synthetic["channel_map_origin"] == "named_by_source"
