lifeboat-tag 1 68294bc06bd7b024fde9470ff8212dbf041475dbf399a930b543f4e5d43bbf56
{
  "vm": "vm1",
  "disk": "data",
  "seq": 3,
  "from_segment": 1,
  "through_segment": 3,
  "time": 1767225720000,
  "consistency": "app",
  "block_size": 4096,
  "shape": {
    "kind": "directory",
    "tree": "164b9cc39970bdc76e9cf471a82fcb6d7cf03639328f3e365a64bf2d2a3598e1"
  }
}