lifeboat-tag 1 623e0faded2bd95e602ef32598601cad135d50d0f0024fa2722429deb034b614
{
  "vm": "vm1",
  "disk": "os",
  "seq": 1,
  "from_segment": 1,
  "through_segment": 1,
  "time": 1767225600000,
  "consistency": "crash",
  "block_size": 4096,
  "shape": {
    "kind": "image",
    "size": 14000
  }
}