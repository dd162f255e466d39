"""What one request may ask of the server, in one place (README lists these limits).

A public app must bound the work and memory a single visitor can cause: every value here is
checked before the work it bounds starts, and a request over a limit gets a message naming it.
"""

MAX_UPLOAD_BYTES = 20 * 10**6  # one uploaded file; gradio refuses larger uploads at the door
MAX_JSON_BODY_BYTES = 10**6  # a request's JSON (settings, a 2,000-character prompt, file references)
MAX_IMAGE_PIXELS = 50 * 10**6  # one photo (8,660 x 5,770, a 50 MP camera); checked from its header first
MAX_EXTRA_PHOTOS = 4  # photos besides the ID image: a person in five photos is plenty
MAX_PEOPLE = 4  # identities in one image, each with its own region (and a cross-attention pass)
MAX_PROMPT_CHARS = 2000  # prompt and negative prompt; T5 reads at most 512 tokens of it, CLIP 77
MAX_IMAGES_PER_REQUEST = 4  # images one request may ask for (one batch)
MAX_QUEUED = 32  # requests waiting at once, all visitors together
MAX_QUEUED_PER_VISITOR = 3  # one visitor's requests running or waiting (by network address)
MAX_LORAS_PER_REQUEST = 8  # LoRAs one request may stack (the UI offers 3 rows)
MAX_UPLOAD_BYTES_PER_HOUR = 2 * 10**9  # what one visitor's uploads may add to the disk in an hour
MIN_FREE_DISK_BYTES = 2 * 10**9  # uploads stop short of this much free space (outputs need room too)
MAX_LORA_STRENGTH = 10.0  # |strength| of one LoRA; speed LoRAs use 0.125-1, style LoRAs about 0.5-1.5
