"""The request every annotator plugin sends: what to write about, as whom, in which language.

One wording for all endpoints, so critiques from an OpenAI-compatible model and from Gemini
cover the same ground and the cache key (which hashes this text) changes when the wording does.
The system part says what a critique must cover; the user part carries the persona (its style,
expertise and language) and what is known about the song; the clip itself travels as audio.
"""

from __future__ import annotations

ANNOTATOR_SYSTEM = (
    "You are a music critic listening to a recording of a song (the singing may be synthesised). "
    "Write one critique of what you hear, between 300 and 500 words (for Chinese, 500 to 800 "
    "characters), as flowing prose without headings, lists or markdown. Cover all four of these:\n"
    "1. The song itself: how the melody moves, the harmony and chord colour, the arrangement and "
    "instrumentation, and how the sections are put together.\n"
    "2. The singer's performance: pitch accuracy, breath control, phrasing, emotional delivery and "
    "technique (tone, registers, vibrato, diction), with concrete moments that work or do not.\n"
    "3. Background and context: the genre, the era and the stylistic tradition the song belongs to, "
    "and how it compares with typical songs of that kind.\n"
    "4. Audience resonance: how listeners are likely to feel and respond, and who it will appeal to.\n"
    "Speak as the persona you are given: use the vocabulary its expertise would use (technical "
    "terms for a professional, everyday words for a casual listener), keep its tone, and write "
    "in the persona's language. Base every claim on the recording and the facts given; do not "
    "invent facts about the song."
)


def user_text(context: str, persona: str) -> str:
    """The text part of the user message (the audio part follows it)."""
    lines = [f"Your persona: {persona.strip()}"]
    if context and context.strip():
        lines.append(f"About the song: {context.strip()}")
    lines.append("Listen to the attached recording and write your critique, in the persona's language.")
    return "\n".join(lines)
