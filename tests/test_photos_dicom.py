"""photos.dicom: DICOM photographs built here from a real photo (VL Photographic uncompressed and JPEG
Baseline, Secondary Capture, planar RGB, MONOCHROME2), full of PHI, go through read -> de-identify ->
write; the output must hold none of the PHI, say what was done, pass dciodvfy and dcmdump, and read
back to the pixels written.  Damaged or unsupported inputs fail with the file's name and the problem."""
import hashlib
import io
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from conftest import REPO, SHARED_DATA, skip_unless_required
from photos.dicom import (SECONDARY_CAPTURE, VL_PHOTOGRAPHIC, DicomError, HeaderDeidentifier, is_dicom,
                          read_photo, write_photo)

PHOTOS = SHARED_DATA / "faces_labelled" / "obama"

PHI_TEXT = ["Doe", "Jane", "Quincy", "MRN-4471-PHI", "OTHER-ID-PHI", "St. Example Eye Clinic", "Harbour Road",
            "Exampleton", "Smith", "Alan", "Brown", "Olivia", "ACC-99812", "ACME PHI", "secret-phi-value",
            "photographed at home", "ST-7731", "CAM-SN-55512"]
PHI_DATES = {"PatientBirthDate": "19710304", "StudyDate": "20230517", "SeriesDate": "20230518",
             "ContentDate": "20230519", "AcquisitionDateTime": "20230519101700"}

# name -> (SOP class, transfer syntax, photometric, planar configuration)
KINDS = {
    "vl_rgb": (VL_PHOTOGRAPHIC, ExplicitVRLittleEndian, "RGB", 0),
    "vl_jpeg": (VL_PHOTOGRAPHIC, JPEGBaseline8Bit, "YBR_FULL_422", 0),
    "sc_planar": (SECONDARY_CAPTURE, ExplicitVRLittleEndian, "RGB", 1),  # VL Image allows only 0
    "sc_rgb": (SECONDARY_CAPTURE, ExplicitVRLittleEndian, "RGB", 0),
    "sc_ybr": (SECONDARY_CAPTURE, ExplicitVRLittleEndian, "YBR_FULL", 0),
    "sc_mono": (SECONDARY_CAPTURE, ExplicitVRLittleEndian, "MONOCHROME2", None),
}


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    jpgs = sorted(PHOTOS.glob("*.jpg"))
    if not jpgs:
        skip_unless_required(f"no .jpg photo in {PHOTOS}")
    return np.asarray(Image.open(jpgs[0]).convert("RGB"))


@pytest.fixture(scope="session")
def validators():
    """dciodvfy and dcmdump, installed by tests/dicom/install_validator.sh where missing and apt exists."""
    if not (shutil.which("dciodvfy") and shutil.which("dcmdump")) and shutil.which("apt-get"):
        done = subprocess.run(["bash", str(REPO / "tests" / "dicom" / "install_validator.sh")],
                              capture_output=True, text=True)
        if done.returncode == 3:
            skip_unless_required(done.stderr.strip())
        assert done.returncode == 0, done.stdout + done.stderr
    if not (shutil.which("dciodvfy") and shutil.which("dcmdump")):
        skip_unless_required("dciodvfy (dicom3tools) or dcmdump (dcmtk) is not installed and there is no apt-get")


def gray_of(rgb: np.ndarray) -> np.ndarray:
    return np.rint(rgb.mean(axis=2)).astype(np.uint8)


def build(path, rgb: np.ndarray, kind: str, *, study_uid: str | None = None, **overrides) -> Dataset:
    """Writes a DICOM photo of ``kind`` holding ``rgb`` and PHI everywhere; returns its dataset."""
    sop_class, syntax, photometric, planar = KINDS[kind]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientSex = "Doe^Jane^Quincy", "MRN-4471-PHI", "F"
    ds.OtherPatientIDs, ds.PatientAge = "OTHER-ID-PHI", "052Y"
    for keyword, value in PHI_DATES.items():
        setattr(ds, keyword, value)
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "101600", "101700"
    ds.InstitutionName, ds.InstitutionAddress = "St. Example Eye Clinic", "12 Harbour Road, Exampleton"
    ds.ReferringPhysicianName, ds.OperatorsName = "Smith^Alan", "Brown^Olivia"
    ds.AccessionNumber, ds.StudyID, ds.StationName = "ACC-99812", "ST-7731", "Doe-home-camera"
    ds.StudyDescription, ds.ImageComments = "Eye photo of Jane Doe", "photographed at home by Olivia Brown"
    ds.Manufacturer, ds.DeviceSerialNumber = "PhotoCam Inc", "CAM-SN-55512"
    ds.Modality = "XC" if sop_class == VL_PHOTOGRAPHIC else "OT"
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation, ds.Laterality = 1, 1, "", "R"
    if sop_class == VL_PHOTOGRAPHIC:
        ds.AcquisitionContextSequence = []
    else:
        ds.ConversionType = "DI"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    if photometric == "MONOCHROME2":
        ds.SamplesPerPixel, ds.PixelData = 1, gray_of(rgb).tobytes()
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, planar
        ds.PixelData = (rgb.transpose(2, 0, 1) if planar else rgb).tobytes()
        if photometric == "YBR_FULL":
            ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    ds.LossyImageCompression = "00"
    if syntax == JPEGBaseline8Bit:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=95, subsampling="4:2:2")
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.LossyImageCompressionRatio = f"{rgb.nbytes / len(buffer.getvalue()):.2f}"
    ds["PixelData"].VR = "OB"
    ds.private_block(0x0009, "ACME PHI", create=True).add_new(0x01, "LO", "secret-phi-value")
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def faces_changed(pixels: np.ndarray) -> np.ndarray:
    """Stands in for the face code: the central region (where the face is) inverted."""
    out = pixels.copy()
    h, w = out.shape[:2]
    out[h // 4: h * 3 // 4, w // 4: w * 3 // 4] ^= 0xFF
    return out


def problems(tool: str, path) -> list[str]:
    done = subprocess.run([tool, str(path)], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    if tool == "dcmdump":
        return [line for line in lines if line.startswith("E:")] + ([f"exit {done.returncode}"] if done.returncode else [])
    return [line for line in lines if line.startswith("Error")]


def codes(ds: Dataset) -> set[str]:
    return {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}


@pytest.mark.parametrize("kind", KINDS)
def test_read_photo_gives_the_rgb_pixels(tmp_path, rgb, kind):
    path = tmp_path / f"{kind}.dcm"
    build(path, rgb, kind)
    assert is_dicom(path)
    photo = read_photo(path)
    assert photo.path == path and photo.pixels.dtype == np.uint8 and photo.pixels.shape == rgb.shape
    if kind == "vl_jpeg":
        # JPEG at quality 95 with 4:2:2 chroma subsampling loses a little (about 0.7 levels on average
        # here); 3 levels allows for another JPEG decoder's rounding but not for a wrong colour conversion.
        assert np.abs(photo.pixels.astype(int) - rgb).mean() < 3
    elif kind == "sc_ybr":  # 8-bit YCbCr and back: rounding twice, at most a couple of levels
        assert np.abs(photo.pixels.astype(int) - rgb).max() <= 2
    elif kind == "sc_mono":
        np.testing.assert_array_equal(photo.pixels, np.repeat(gray_of(rgb)[:, :, None], 3, axis=2))
    else:
        np.testing.assert_array_equal(photo.pixels, rgb)


@pytest.mark.parametrize("kind", KINDS)
def test_deidentified_output_holds_no_phi_and_says_what_was_done(tmp_path, rgb, kind):
    src, out = tmp_path / "in.dcm", tmp_path / "out" / "deid.dcm"
    original = build(src, rgb, kind)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    photo = read_photo(src)
    header = HeaderDeidentifier().deidentify(photo.dataset, faces_cleaned=True)
    assert photo.dataset.PatientName == "Doe^Jane^Quincy" and "secret-phi-value" in str(photo.dataset)  # unchanged
    pixels = faces_changed(photo.pixels)
    write_photo(header, pixels, out)

    data = out.read_bytes()
    phi = PHI_TEXT + list(PHI_DATES.values()) + [original.StudyInstanceUID, original.SeriesInstanceUID,
                                                 original.SOPInstanceUID]
    assert [text for text in phi if text.encode() in data] == []
    ds = pydicom.dcmread(out)
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    assert codes(ds) == {"113100", "113107", "113102"}
    assert all(item.CodingSchemeDesignator == "DCM" for item in ds.DeidentificationMethodCodeSequence)
    assert ds.RecognizableVisualFeatures == "NO" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "BurnedInAnnotation" not in ds  # not stated in the input: not stated by us either
    assert not any(element.tag.is_private for element in ds.iterall())
    assert "PatientAge" not in ds and "StudyDescription" not in ds and "ImageComments" not in ds
    assert ds.SOPClassUID == original.SOPClassUID and ds.SOPInstanceUID != original.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (*rgb.shape[:2], 8, 8, 7)
    if kind == "sc_mono":
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        expected = np.repeat(gray_of(pixels)[:, :, None], 3, axis=2)
    else:
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
        expected = pixels
    if kind == "vl_jpeg":
        assert ds.LossyImageCompression == "01"  # it went through JPEG once
    np.testing.assert_array_equal(read_photo(out).pixels, expected)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["deid.dcm"]  # no temp file left


@pytest.mark.parametrize("kind", KINDS)
def test_input_and_output_pass_dciodvfy_and_dcmdump(tmp_path, rgb, kind, validators):
    src, out = tmp_path / "in.dcm", tmp_path / "out.dcm"
    build(src, rgb, kind)
    assert problems("dciodvfy", src) == []  # the inputs are valid objects of their IOD
    photo = read_photo(src)
    write_photo(HeaderDeidentifier().deidentify(photo.dataset, faces_cleaned=True), faces_changed(photo.pixels), out)
    assert problems("dciodvfy", out) == []
    assert problems("dcmdump", out) == []


def test_faces_not_cleaned_claims_no_clean_visual_features(tmp_path, rgb):
    src, out = tmp_path / "in.dcm", tmp_path / "out.dcm"
    build(src, rgb, "vl_rgb")
    photo = read_photo(src)
    write_photo(HeaderDeidentifier().deidentify(photo.dataset, faces_cleaned=False), photo.pixels, out)
    ds = pydicom.dcmread(out)
    assert codes(ds) == {"113100", "113107"}
    assert ds.RecognizableVisualFeatures == "YES" and ds.PatientIdentityRemoved == "YES"


def test_one_run_keeps_a_study_together_and_two_runs_do_not_link(tmp_path, rgb):
    study = generate_uid()
    first, second = (build(tmp_path / f"{i}.dcm", rgb[:64, :64].copy(), "vl_rgb", study_uid=study) for i in range(2))
    run = HeaderDeidentifier()
    a, b = (run.deidentify(read_photo(tmp_path / f"{i}.dcm").dataset, faces_cleaned=True) for i in range(2))
    assert a.StudyInstanceUID == b.StudyInstanceUID != study
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyDate == b.StudyDate != PHI_DATES["StudyDate"]  # one date offset per run
    other = HeaderDeidentifier().deidentify(read_photo(tmp_path / "0.dcm").dataset, faces_cleaned=True)
    assert other.StudyInstanceUID not in (study, a.StudyInstanceUID)


def test_burned_in_annotation_yes_is_refused_and_no_is_kept(tmp_path, rgb):
    small = rgb[:32, :32].copy()
    build(tmp_path / "yes.dcm", small, "vl_rgb", BurnedInAnnotation="YES")
    with pytest.raises(DicomError, match="yes.dcm.*Burned In Annotation"):
        HeaderDeidentifier().deidentify(read_photo(tmp_path / "yes.dcm").dataset, faces_cleaned=True)
    build(tmp_path / "no.dcm", small, "vl_rgb", BurnedInAnnotation="NO")
    assert HeaderDeidentifier().deidentify(read_photo(tmp_path / "no.dcm").dataset,
                                           faces_cleaned=True).BurnedInAnnotation == "NO"


def test_write_photo_never_writes_onto_its_input(tmp_path, rgb):
    src = tmp_path / "in.dcm"
    build(src, rgb[:32, :32].copy(), "vl_rgb")
    before = src.read_bytes()
    photo = read_photo(src)
    with pytest.raises(DicomError, match="in.dcm.*input"):
        write_photo(photo.dataset, photo.pixels, src)
    assert src.read_bytes() == before


def bad_inputs(tmp_path, rgb) -> dict:
    small = rgb[:48, :40].copy()
    valid = tmp_path / "valid.dcm"
    build(valid, small, "vl_rgb")
    (tmp_path / "truncated.dcm").write_bytes(valid.read_bytes()[:300])
    (tmp_path / "cut_pixels.dcm").write_bytes(valid.read_bytes()[:-100])
    (tmp_path / "holiday.dcm").write_bytes((sorted(PHOTOS.glob("*.jpg"))[0]).read_bytes())
    two = np.concatenate([small, small])
    build(tmp_path / "multiframe.dcm", small, "sc_rgb", NumberOfFrames=2, PixelData=two.tobytes())
    build(tmp_path / "ct.dcm", small, "sc_rgb", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    build(tmp_path / "sixteen.dcm", small, "sc_mono", BitsAllocated=16, BitsStored=12, HighBit=11,
          PixelData=gray_of(small).astype("<u2").tobytes())
    nopixels = build(tmp_path / "nopixels.dcm", small, "vl_rgb")
    del nopixels.PixelData
    nopixels.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    return {"truncated.dcm": "truncated", "cut_pixels.dcm": "truncated", "holiday.dcm": "not a DICOM file",
            "multiframe.dcm": "multi-frame image (2 frames)", "ct.dcm": "unsupported SOP class 1.2.840.10008.5.1.4.1.1.2",
            "sixteen.dcm": "BitsAllocated is 16", "nopixels.dcm": "no Pixel Data (7FE0,0010)"}


def test_damaged_or_unsupported_files_fail_naming_the_file_and_the_problem(tmp_path, rgb):
    for name, problem in bad_inputs(tmp_path, rgb).items():
        with pytest.raises(DicomError) as caught:
            read_photo(tmp_path / name)
        assert name in str(caught.value) and problem in str(caught.value), str(caught.value)
    assert not is_dicom(tmp_path / "holiday.dcm") and not is_dicom(tmp_path / "missing.dcm")


def test_photos_dicom_imports_neither_jax_nor_torch():
    code = "import sys, photos.dicom; print(sorted({'jax', 'torch', 'flax'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
