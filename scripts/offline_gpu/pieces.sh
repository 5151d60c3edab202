# Sourced by sft.sh and rest.sh: how a checkpoint travels back from the GPU machine (unpack.sh joins it here).
# fp16 SRC DST: SRC's model saved to DST in fp16 through the model's own save_pretrained (the shipped checkpoints' cast)
fp16() {
  rm -rf "$2" && python3 -c "import sys, torch; from segcompass.model import SegCompass
SegCompass.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.float16)" "$1" "$2"
}
# ship DIR RET: DIR's model.safetensors as RET/w00, w01, ... of 15 MB (replacing earlier pieces), the rest of DIR as
# RET/meta.tar
ship() {
  rm -f "$2"/w[0-9][0-9] "$2/meta.tar"
  split -b 15000000 -d "$1/model.safetensors" "$2/w"
  tar -C "$1" --exclude model.safetensors -cf "$2/meta.tar" .
  md5sum "$1/model.safetensors"
}
