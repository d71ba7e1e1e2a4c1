lifeboat-tag 1 34e70a80a1fc14cee9045d0fd3d4a602bd9d6dd7327db9e0702f641c9021c43b
{
  "vm": "vm1",
  "disk": "os",
  "seq": 1853070350745600003,
  "from_segment": 1853070350745600001,
  "through_segment": 1853070350745600003,
  "time": 1767225720000,
  "consistency": "app",
  "block_size": 4096,
  "shape": {
    "kind": "image",
    "size": 16384
  }
}