lifeboat-tag 1 a811b6e605c5e04151aedc063c3f7dd77cf13d30e2f75b6aef7d7b7e6bb4b691
{
  "vm": "vm1",
  "disk": "os",
  "seq": 2,
  "from_segment": 1,
  "through_segment": 2,
  "time": 1767225660000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "image",
    "size": 14000
  }
}