"""Print what the trainer environment can do, as JSON: {"cuda": bool, "device": str, "bitsandbytes": bool}."""
import importlib.util
import json


def main():
    import torch
    cuda = torch.cuda.is_available()
    print(json.dumps({'cuda': cuda, 'device': torch.cuda.get_device_name(0) if cuda else 'CPU only',
                      'bitsandbytes': importlib.util.find_spec('bitsandbytes') is not None,
                      'torch': torch.__version__}))


if __name__ == '__main__':
    main()
