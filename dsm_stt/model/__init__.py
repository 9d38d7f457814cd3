"""Pure PyTorch model code: Mimi encoder, DSM LM, tokenizer, checkpoint loading. No I/O beyond
reading checkpoint files; no knowledge of slots' owners, protocols or asyncio."""
