"""What the synthetic corpus says: GRID-grammar sentences (the six-word command sentences of
the GRID corpus, spelled by its file names) and varied free English sentences.

Pure text and numpy: speaking them is training/speech.py's job (espeak-ng).
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------- GRID grammar

# GRID file names spell the sentence one character per word (Cooke et al. 2006):
# command colour preposition letter digit adverb, e.g. lrwp9a = "lay red with p nine again".
GRID_COMMANDS = {"b": "bin", "l": "lay", "p": "place", "s": "set"}
GRID_COLOURS = {"b": "blue", "g": "green", "r": "red", "w": "white"}
GRID_PREPOSITIONS = {"a": "at", "b": "by", "i": "in", "w": "with"}
GRID_LETTERS = "abcdefghijklmnopqrstuvxyz"  # 25: GRID has no "w" (three syllables long)
GRID_DIGITS = {
    "z": "zero", "1": "one", "2": "two", "3": "three", "4": "four",
    "5": "five", "6": "six", "7": "seven", "8": "eight", "9": "nine",
}  # fmt: skip
GRID_ADVERBS = {"a": "again", "n": "now", "p": "please", "s": "soon"}
_GRID_SLOTS = (GRID_COMMANDS, GRID_COLOURS, GRID_PREPOSITIONS, None, GRID_DIGITS, GRID_ADVERBS)
_GRID_SLOT_NAMES = ("command", "colour", "preposition", "letter", "digit", "adverb")


def grid_sentence_from_id(grid_id: str) -> str:
    """``"lrwp9a"`` -> ``"lay red with p nine again"`` (a GRID file stem, any case)."""
    code = grid_id.strip().lower()
    if len(code) != 6:
        raise ValueError(f"GRID id {grid_id!r} must have 6 characters (e.g. 'lrwp9a'), one per word")
    code = code[:4] + ("z" if code[4] == "0" else code[4]) + code[5]
    words = []
    for ch, table, slot in zip(code, _GRID_SLOTS, _GRID_SLOT_NAMES, strict=True):
        choices = {c: c for c in GRID_LETTERS} if table is None else table
        if ch not in choices:
            raise ValueError(f"GRID id {grid_id!r}: {ch!r} is no {slot}; valid: {''.join(choices)}")
        words.append(choices[ch])
    return " ".join(words)


def random_grid_id(rng: np.random.Generator) -> str:
    """A GRID id drawn uniformly from the 4*4*4*25*10*4 = 64,000 sentences."""
    pools = [list(GRID_LETTERS) if t is None else list(t) for t in _GRID_SLOTS]
    return "".join(str(pool[int(rng.integers(len(pool)))]) for pool in pools)


def grid_sentence(rng: np.random.Generator) -> str:
    """A random sentence in the GRID grammar, e.g. ``"place white by y zero soon"``."""
    return grid_sentence_from_id(random_grid_id(rng))


def grid_speakable(sentence: str) -> str:
    """Text for espeak-ng that says a GRID sentence as GRID speakers do.

    espeak reads the letter slot as a letter name for every letter but "a", which it reads
    as the article (a schwa); the letter is given as espeak phonemes instead (``[['eI]]``,
    honoured because ``synthesize`` passes ``espeakPHONEMES``). The transcript for an
    aligner stays the plain sentence.
    """
    words = sentence.split()
    if len(words) == 6 and words[3] == "a":
        words[3] = "[['eI]]"
    return " ".join(words)


# ----------------------------------------------------------------------------- free text

# Varied English for utterances outside the GRID grammar: the first 40 are Harvard sentences
# (IEEE 1969, public domain), the rest were written for this project to cover every English
# phoneme in varied positions, with questions, lists, names and numbers.
FREE_SENTENCES: tuple[str, ...] = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
    "Whose shoes are those beside the zoo gate?",
    "My mother made marmalade in May.",
    "Vivian's van veered off the wet avenue.",
    "Please pass the peppers to Peter and Paul.",
    "Would you wait while we walk over the bridge?",
    "Oh no, I forgot my umbrella again.",
    "Think of the thin thread that holds the theory together.",
    "The judge measured the vision of the jury.",
    "Bright yellow boats bob gently in the harbour.",
    "Why would anyone buy a boiled toy?",
    "The cheap sheep ship sailed at the church's behest.",
    "We usually eat oatmeal, eggs and orange juice at eight.",
    "Could you call me back at nine thirty tomorrow morning?",
    "An owl hooted loudly outside our old house.",
    "Few people knew the new pupil's name.",
    "Ask Arthur about the art of the ancient harp.",
    "Put the book on the wooden shelf, would you?",
    "Her voice was soft, but her words were firm.",
    "The weather today is warmer than it was last week.",
    "Twelve thousand people watched the final match.",
    "Mummy bought a bumpy blue bobble hat.",
    "I'm afraid the train to Edinburgh is delayed by an hour.",
    "Every evening the children feed the ducks by the pond.",
    "Is it true that bees can see ultraviolet light?",
    "Open the window and let the fresh air in.",
    "Zoe zipped her bag and rushed to the bus.",
    "Show me how you solved the puzzle so quickly.",
    "The thick fog made it hard to see the road.",
    "Honestly, I have never heard such a lovely song.",
    "Keep calm and carry on working until lunch.",
    "Which way is the way to the market square?",
    "Our neighbour's dog barks at every passing car.",
    "Maybe we should measure twice and cut once.",
    "Yesterday I saw a rainbow over the hills.",
    "Good morning, how are you feeling today?",
    "She sells sea shells on the sunny shore.",
    "Grab the garden hose before the flowers wilt.",
    "The movie starts at a quarter past seven.",
    "Joyful voices echoed through the empty hall.",
    "Let me know whether the package arrives on Monday.",
)


def free_sentence(rng: np.random.Generator) -> str:
    """A random sentence from ``FREE_SENTENCES``."""
    return FREE_SENTENCES[int(rng.integers(len(FREE_SENTENCES)))]
