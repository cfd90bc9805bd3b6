"""Built-in prompt sets: one to calibrate on, one held out to measure the quality cost.

Written for this pack to cover what ComfyUI users type: subjects, styles, photography and art jargon, short
tags, long prompts (more than 77 tokens, so more than one row), `(word:1.3)` weights and negative prompts.
The two sets share no prompt, so the report measures prompts the scales were not fitted to.
"""
from __future__ import annotations

import re
from typing import Sequence

CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a windowsill",
    "portrait of an old fisherman, weathered skin, dramatic lighting, 85mm lens",
    "a castle on a hill at sunset, oil painting, impressionist",
    "cyberpunk city street at night, neon signs, rain, reflections on wet asphalt",
    "a bowl of ramen, food photography, steam rising, shallow depth of field",
    "anime girl with long silver hair, school uniform, cherry blossoms",
    "isometric low poly island with palm trees, 3d render, pastel colors",
    "watercolor illustration of a fox in a snowy forest",
    "a red sports car drifting on a mountain road, motion blur",
    "macro photograph of a dew drop on a spider web",
    "an astronaut riding a horse on mars, cinematic",
    "minimalist logo of a mountain and sun, flat vector, white background",
    "a cozy library with wooden shelves and a fireplace, warm light",
    "pixel art of a knight fighting a dragon, 16-bit",
    "a bustling medieval market, crowds, banners, detailed, matte painting",
    "close-up of an eye with a galaxy reflected in the iris",
    "children's book illustration of a bear having a picnic",
    "brutalist concrete building under an overcast sky, architectural photography",
    "a koi pond in a japanese garden, autumn leaves",
    "steampunk airship above the clouds, brass and copper, intricate",
    "black and white street photography, new york 1950s, a man with an umbrella",
    "a golden retriever puppy playing in the grass",
    "surreal melting clocks in a desert landscape",
    "underwater coral reef with tropical fish, sun rays",
    "a wizard casting a spell, glowing runes, fantasy art, artstation",
    "product shot of a perfume bottle on marble, studio lighting",
    "a lighthouse in a storm, huge waves crashing, dramatic sky",
    "ukiyo-e woodblock print of a great wave and mount fuji",
    "a robot gardener watering flowers, soft morning light",
    "interior design of a scandinavian living room, minimal, bright",
    "portrait of a woman in renaissance style, oil on canvas, chiaroscuro",
    "a tiny house in the woods, tilt-shift photography",
    "northern lights over a frozen lake, long exposure",
    "a plate of sushi, top-down view, on a slate board",
    "concept art of an alien jungle planet with giant mushrooms",
    "a vintage typewriter on a desk, film grain, kodak portra 400",
    "a samurai standing in a bamboo forest, mist, ink wash painting",
    "graffiti mural of a tiger on a brick wall",
    "an owl perched on a branch at night, full moon",
    "a futuristic train station, clean lines, white and glass, people walking",
    "hyperrealistic pencil drawing of a hand holding a rose",
    "a bakery storefront in paris, morning, croissants in the window",
    "epic battle between two armies, thousands of soldiers, aerial view",
    "a cute slime monster, chibi, sticker design, white border",
    "desert canyon at golden hour, layered red rock, wide angle",
    "stained glass window depicting a phoenix",
    "a chess board mid-game, dramatic side light, shallow focus",
    "a snowy mountain village with lights in the windows, christmas eve",
    "a jellyfish glowing in the deep sea, bioluminescence",
    "fashion editorial, model in a yellow raincoat, studio backdrop",
    "1girl, solo, smile, looking at viewer, blue eyes, short hair, outdoors",
    "landscape, mountains, river, clouds, scenery, no humans",
    "(masterpiece:1.2), (best quality:1.1), a dragon curled around a tower",
    "a (red:1.4) balloon floating over a (grey:0.7) city",
    "portrait of a knight, (intricate armor:1.3), (blurry background:0.8)",
    "((a cat)) wearing a tiny crown, (royal portrait:1.2), oil painting",
    "a forest path, (volumetric fog:1.25), (sunbeams:1.15), photorealistic",
    "blurry, low quality, jpeg artifacts, watermark, text, deformed hands",
    "worst quality, low resolution, bad anatomy, extra fingers, cropped",
    "ugly, duplicate, morbid, mutilated, out of frame, poorly drawn face",
    "a sprawling fantasy city built into the side of a colossal waterfall, with terraced gardens, arched stone "
    "bridges, hanging lanterns, airships docking at wooden piers, merchants selling spices and silk in crowded "
    "bazaars, children chasing birds along the railings, mist rising from the falls into a sky streaked with "
    "pink and orange clouds at dawn, painted in the style of a detailed nineteenth century romantic landscape",
    "photograph of an elderly couple dancing in their kitchen on a sunday afternoon, soft window light, the "
    "radio on the counter, flour on the table from the bread they baked, family photos on the fridge, a cat "
    "watching from a chair, warm tones, candid, documentary style, shot on a 35mm camera with natural grain, "
    "gentle smiles, hands held, a sense of a long life lived together",
    "(highly detailed:1.2) sci-fi cockpit interior, holographic displays, (blue and orange lighting:1.3), a "
    "pilot in a pressure suit checking instruments, stars streaking past the canopy, scratches and wear on "
    "the panels, cables, switches, warning lights, reflections on the visor, cinematic composition, octane "
    "render, depth of field, volumetric light, (film still:0.9), anamorphic lens flare",
    "a botanical illustration plate showing the life cycle of a sunflower, seed, sprout, bud, bloom and "
    "seed head, labelled in fine italic script, cream paper, (hand-colored engraving:1.2)",
)

HELD_OUT_PROMPTS: tuple[str, ...] = (
    "a photo of a dog running on the beach",
    "an oil painting of a sailing ship in a storm",
    "a girl reading a book under a tree, studio ghibli style",
    "a bowl of fruit on a wooden table, still life, soft light",
    "a neon-lit alley in tokyo at night, rain",
    "a portrait of a man with a beard, black and white, high contrast",
    "a fantasy castle floating in the sky, digital art",
    "a hummingbird drinking from a flower, macro, high speed photography",
    "a mountain lake at dawn, mirror reflection, pine trees",
    "a robot playing the violin on a stage, spotlight",
    "vector illustration of a coffee cup, flat design",
    "a snowy street in an old european town, evening",
    "(masterpiece:1.3), a phoenix rising from flames, (vivid colors:1.2)",
    "a cat, (sleeping:1.4), (sunlight:0.8)",
    "lowres, bad hands, text, error, missing fingers, blurry",
    "an ancient temple overgrown by jungle vines, moss covered stone steps leading up to a carved doorway, shafts "
    "of light falling through the canopy, parrots in the trees, explorers with lanterns at the entrance, a "
    "sense of mystery and discovery, painted like a classic adventure film poster from the nineteen thirties",
    "a detailed map of an imaginary kingdom with rivers, forests, mountains, villages and a capital city, sea "
    "monsters in the ocean, a compass rose in the corner, parchment texture, (ink and watercolor:1.2), "
    "calligraphic labels, decorative border with vines and small illustrations of castles and ships",
    "a cup of tea",
    "a skyscraper made of glass and plants, solarpunk",
    "a close-up of a tiger's face, national geographic",
    "a child building a sandcastle, golden hour",
    "an abstract painting with bold red and blue shapes",
    "a medieval knight's helmet on a wooden table, museum lighting",
    "a field of lavender in provence, summer",
)


def parse_prompts(text: str | Sequence[str]) -> list[str]:
    """Text: one prompt per line; blank lines and lines starting with '#' are skipped. A list (a prompt list
    wired into the node): one prompt per item, whatever it starts with ('#1 best quality' is a prompt); an
    item's line breaks become spaces, as ComfyUI's tokenizer reads them."""
    if not isinstance(text, str):
        return [p for p in (" ".join(_lines(str(v))).strip() for v in text) if p]
    return [line.strip() for line in _lines(text.lstrip("\ufeff"))  # a byte-order mark would hide a first '#'
            if line.strip() and not line.strip().startswith("#")]


def _lines(text: str) -> list[str]:
    # Only line breaks: str.splitlines() also splits at form feeds, \x1c-\x1e, \x85 and U+2028/2029, which a
    # pasted prompt may hold.
    return re.split(r"\r\n|\r|\n", text)


def evaluation_prompts(text: str | Sequence[str]) -> tuple[list[str], str]:
    """The held-out prompts of an optional widget (empty: the built-in ones) and a note for the report when the
    widget holds text but no prompt (only # lines), so that the built-in ones were used."""
    own = parse_prompts(text or "")
    if own:
        return own, ""
    note = (f"Note: evaluation_prompts holds no prompt, only # lines: the {len(HELD_OUT_PROMPTS)} built-in "
            "held-out prompts were used.") if isinstance(text, str) and text.strip() else ""
    return list(HELD_OUT_PROMPTS), note


DEFAULT_CALIBRATION_TEXT = "\n".join(CALIBRATION_PROMPTS)
