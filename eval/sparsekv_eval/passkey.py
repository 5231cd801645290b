"""Generated prompts (no data files): a few short ones, and the classic passkey-retrieval prompt of
a chosen token length. Used by the demo, the engine tests and the serving benchmark."""

SHORT = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors: red,",
    "Water boils at a temperature of",
]

def passkey_prompt(tokenizer, target_tokens: int, passkey: str, depth: float = 0.5) -> str:
    """The classic passkey-retrieval prompt (Mohtashami & Jaggi, 2023), completion style, of about
    `target_tokens` tokens with the passkey at relative `depth`."""
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.")
    filler = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key."
    question = " What is the pass key? The pass key is"
    per = len(tokenizer(filler).input_ids)
    fixed = len(tokenizer(head + needle + question).input_ids)
    n = max(1, (target_tokens - fixed) // per)
    at = int(n * depth)
    return head + filler * at + needle + filler * (n - at) + question
