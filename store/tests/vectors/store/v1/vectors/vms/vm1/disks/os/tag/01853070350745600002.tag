lifeboat-tag 1 cccf04883d2ed06daef1175ece6b04da8fdb633f75c359fb215700a671a67325
{
  "vm": "vm1",
  "disk": "os",
  "seq": 1853070350745600002,
  "from_segment": 1853070350745600001,
  "through_segment": 1853070350745600002,
  "time": 1767225660000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "image",
    "size": 14000
  }
}