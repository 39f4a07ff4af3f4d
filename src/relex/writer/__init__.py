"""Writers: streaming sharded safetensors and complete Hugging Face model folders."""

from relex.writer.hf_folder import (ModelFolderWriter, check_output_free, dtype_name, publish_all,
                                    warn_if_no_tokenizer)
from relex.writer.safetensors_writer import PlannedTensor, ShardedWriter, plan_shards

__all__ = ["ModelFolderWriter", "PlannedTensor", "ShardedWriter", "check_output_free", "dtype_name", "publish_all",
           "plan_shards", "warn_if_no_tokenizer"]
