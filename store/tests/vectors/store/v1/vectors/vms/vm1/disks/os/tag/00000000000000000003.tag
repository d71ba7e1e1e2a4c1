lifeboat-tag 1 a199f1c4a8462d911126b7020be61e266d73e36126b0d2e563b427f1b6e7df2c
{
  "vm": "vm1",
  "disk": "os",
  "seq": 3,
  "from_segment": 1,
  "through_segment": 3,
  "time": 1767225720000,
  "consistency": "app",
  "block_size": 4096,
  "shape": {
    "kind": "image",
    "size": 16384
  }
}