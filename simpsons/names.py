"""Names and defaults that several modules share, with no imports: metric keys, the node-local
cache, the stored image side, the class list and the architectures. Each is spelled here once."""

SCORE = "val_macro_f1"  # the metric runs, checkpoints, sweeps and MLflow rank epochs by
MID_EPOCH = "mid_epoch"  # set in the metrics of a mid-epoch report: no validation, never the best checkpoint
EVALUATED = "evaluated"  # False in the metrics of an epoch that train.evaluate_every skips: SCORE is -inf
LAST_SCORE = "last_val_macro_f1"  # SCORE of the last evaluated epoch, in every epoch's metrics (for Tune)

CACHE_DIR = "~/.cache/simpsons"  # downloads, unpacked archives, packed datasets, pretrained weights
STORED_SIZE = 144  # side (px) of the packed uint8 images; training crops and resizes from these

# The original project's 42 characters, in label order.
CLASS_NAMES = (
    "abraham_grampa_simpson", "agnes_skinner", "apu_nahasapeemapetilon", "barney_gumble",
    "bart_simpson", "carl_carlson", "charles_montgomery_burns", "chief_wiggum", "cletus_spuckler",
    "comic_book_guy", "disco_stu", "edna_krabappel", "fat_tony", "gil", "groundskeeper_willie",
    "homer_simpson", "kent_brockman", "krusty_the_clown", "lenny_leonard", "lionel_hutz",
    "lisa_simpson", "maggie_simpson", "marge_simpson", "martin_prince", "mayor_quimby",
    "milhouse_van_houten", "miss_hoover", "moe_szyslak", "ned_flanders", "nelson_muntz",
    "otto_mann", "patty_bouvier", "principal_skinner", "professor_john_frink",
    "rainier_wolfcastle", "ralph_wiggum", "selma_bouvier", "sideshow_bob", "sideshow_mel",
    "snake_jailbird", "troy_mcclure", "waylon_smithers",
)  # fmt: skip
assert list(CLASS_NAMES) == sorted(CLASS_NAMES) and len(CLASS_NAMES) == 42

# Each architecture's classifier module: the part that is new when weights trained on other
# classes are loaded (and that fine-tuning trains at the full learning rate).
HEADS = {
    "original": "fc",
    "resnet18": "fc",
    "resnet50": "fc",
    "efficientnet_b0": "classifier",
    "convnext_tiny": "classifier",
    "mobilenet_v3_large": "classifier",
}
ARCHS = tuple(HEADS)
RESIDUAL_ARCHS = ("original", "resnet18", "resnet50")  # what model.zero_init_residual applies to
