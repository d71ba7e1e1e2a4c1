lifeboat-tag 1 fb3b388a99250b4e6c3d14a74bd41e37913350771b755b865516f0f3d835733d
{
  "vm": "vm1",
  "disk": "os",
  "seq": 1853070350745600001,
  "from_segment": 1853070350745600001,
  "through_segment": 1853070350745600001,
  "time": 1767225600000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "image",
    "size": 14000
  }
}