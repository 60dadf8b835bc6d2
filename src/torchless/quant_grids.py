"""The lattice grids of ggml's IQ1/IQ2/IQ3 block types (iq2xxs_grid ... iq1s_grid in ggml), as
int8 tables (n_points, 4 or 8): a block stores indices into them.

Generated once from gguf-py's grid tables (`gguf.quants.<TYPE>.grid` after `init_grid()`) and
stored as zlib-compressed bytes, base64; tests/test_quant.py::test_iq_grids_match_gguf_py checks
every table against gguf-py. Decoded on first use (33 KiB in all).
"""

from __future__ import annotations

import base64
import zlib
from functools import lru_cache

import numpy as np

_PACKED = {
    "IQ2_XXS": ((256, 8), (
        "eNqFVVuS5CAM++UKOoPuf78ZLMmYLLXT1SkSYvyQZGct/egVuDfoFQtPA34M6RXLB74HqRW/N9rm5ZBZmWc5hK+vY+AT"
        "II55Oz4Xc1+OMZ2PANgWtccrIBOYqYzwEdoH7cfP5EyQSZRJmNpHlbLNMZHCBghKgy/kfh/pOLPgxOgrwUkXoRKrCjo7"
        "OpsJlGOXAY+LMhvQfIGM8/OST2CBvwAWw4JlAk5ZIEC/AZZ7Gz0A54Z5AJ4rkTr1hYuAijSIEEdlXMqryIOQ7paoHJEM"
        "MaVPr5LNJGRq90isoTxEVbGC6xCHFaiptZQ2CXVH7Jcidiuqkf2HaGMR8XTsdXUBrOaA1wwdgeAjFOca+ZsFwOu65Ftx"
        "RlUllEtQfAsLlCKiobobAotS+sSnwyXK0elKQHnT7Wo7wXjB2T3XGr/hOQJmhKxuiaqLvuNeOMKh91qGAl9aAOZkESSO"
        "W4KnIS9sJL3/NQJ5NYRiUX9pGrNBgEysAb4ahXruSTY/O/mcdAJRbDOSXlzd1WuOymbMktGQnRrkNQF7LBgFz106e/rD"
        "kjZmRpFm1KMx3WvRuqemoa19esbHuBgw7VKggELYclb7VH91Xf5hzoD21KEk6CpbkT/vBJbU"
    )),
    "IQ2_XS": ((512, 8), (
        "eNp1V9GV5DAI+3ULqkH99zcTkDA48e7LcZtJbBCS8KyVP1QE5g0qYmE8QEVwvkBFYC6ApQW0EBX/j42FqQjMjbD4uSEV"
        "/0+NBLAwEvm/NhKCLidGxeepnigVn3R64lTE4mchVHxe64Vh4btAUp+r0EvBvp6HOwBY+AQCS0AcgDzbd0D+/5ANk9WT"
        "8SINMCpGFQ3A2P0DSCoGjA1YLAyAeQDtrW5AGwtfBh4Lnw1wymcjkDtXQ1zS2ZCHRr0xdIMQlKhGuTfOyRcVDcrZyOgK"
        "N5SvxvJkOpnrZjT0t8arhBVlDEVwEOG/DXU/IoaKUZiAkzBuFjAJhMHGTSSXCkxiYXRrE4wkOqVuhDN0wCSgf08i+s6L"
        "kEVERKSi33TKvBKVg7BupblpDjiDk8jOyMXEYp3Ykc4muDO/Er0IHrXEemyVnsTnKQDEi/lRE4JTIQohhEc+9GnCMHWd"
        "8urcK7d9C8dIX4WTrK0OXAXEjMAUkn9PQbmTp7BAfgosEYo3IyIBKSYwMXouDgF2E+Y2i2hafs7MzAINhWqyUY9TWO4K"
        "8k+9xc3ENYeLh0EJ3JVjjt9i8Cl8I4Q5FqEti/GnMUDuiTnGXkbhm5hjppRzGgjmGHgZCcTm7MhW3GksVMS01zIao4Fp"
        "c6VcZ4FpW5Xb3ZCm0l8GhSH3R2tdxkkJrd0NDFNmrwkLqHdImbBMYNWW6Bkm3UPsur8azUoZmPSp1F9GSA4HuxkjJswF"
        "dq68DZLnCUDIMdVQzngaJ+Y2ydcsY4uyGyurSupvov1nZYOQE6wZMXzoyeFiY0aahDxU9VD1fCx0NXDlTp9e0gQ13Zux"
        "h2eFlehoEIwvl6ANvsic2o0KkIwD9lk2TD8SpMi5cnYDcj49M79m+GtFDQoXdg4MH05c8G1w2FltjnqxALICeBkwG0Ac"
        "A4dj8LD26q67AT4Hkzauzm/30DEjh88eXFJkCi1nbyBM97QG2UrKOYt8etUE8ajTMLEJerwsf5JRTKGQK0LcBqMKYtmn"
        "bDLLqdNGMSP33gPUTC+HsYxTK0nQvB9LUDHZKYtjMC4olmJHSXDpQ9OOa4/8RqtqLTlbrDbUirFaO0GbbKtIwPNkvb9q"
        "oQkkksycQxnuRD/csy2hiV5Xop9H0TxyEW3w67E6kfnnB+/mPr4="
    )),
    "IQ2_S": ((1024, 8), (
        "eNqFmWF25DAIg//6CjoD979fG5sPI2bS7r48tttJYoOQhGet8ycySv4fkVFL9oHIqPAbIqPkD9DKB+SDIuPvx+zBkVHy"
        "F2mFvTAyKnwBkfH3LluQlr4u7PfHc1/kz3mx4Mj43NU3EBmfZfYNacXXjUXG5+N9o1qyDUdGhSdAykRE/rwyISMxkVHK"
        "uOJrorieh/XEaelrAp/0RKalJzQyPtvtCX620RP9PO48xxMf6yRePflsjpe1gkTGnZ1WoL3aVqjIuN/SChcZd9laISOj"
        "lqywkXGnvxU6Mu40t6UBgMiocEDstJx151Yi7wsDDLXhAkCRUUsGqMi4l9MAtl+nk3i11AG8yLg/1oAYGSUHplZ8BWhk"
        "lBKwkT8vfQUwpaPWXAoHtuQAlxzoWnLAJzPsVP3RAGCe3HIBktU3Ffny1igb3XH6IqGn3kCRcVe5NVRk3NmMzF7kbiN3"
        "2Rpv/zayrSJ5qkF9NmRk3LBtDbrh2Bp0wyUSJpFwsMYN9VbaC2sNrSVr7FhhDR6j0Z+7eysuIy/VHpaxqAqsgEXGQsrF"
        "XYKgFJIThgz9oBh0XiKJ1VEFii51LKvWJRzJiUeZpUlAQERyQiKn/IWgIuOhmUtYkfHQySUw7iQFkfHQwCW2yHja+xId"
        "b5yEB6RPO14CZGUQISsk9WCSmh7Y3x1MgjywvTuDMNnhG2HSYnAiPUxGVicnSKQRK00BwZLB1Tddi7vEGxlPGi8Rk/lJ"
        "yFAAt5403ApNwqZiq3Ehvd2JnNxyQexUehI8FMTSIXwQMYkfhLwJAFuHM0HSFASQ9SYMD7915NGaoWY2mnCwVy6QunqT"
        "xi3JTlRD8hWYMGQXFTRKVispmkAHTGGiI6ZAPSp0nhd/CtWT3C5YSAJQQovouNVFt1zgFTbIPtJ10aFT8AAloJjCd9Tn"
        "CmCkANLhUwjp9cLickFE4qollr4KJJbqTShLg/LvWWikb42UmC6k+Yna0vkkTAS1h5q5bYJLT2FaEPu67hsv+TaBhkym"
        "UJ/kd8F2Zw1FUAKYcgo6zDmFPXbbXoHHil6hlwm+Nlyv8Bc1rWZGGzNPY3CTfH6AuUsadzridEf3DmAV43AfsaN8LGUM"
        "Zegog0FF5WMkvVXKsdzklBEBCfLxDvEpxVlOipBaGReQVGTg41YZGopFMUhmJcvHopIGWk8+xqDic0xBdVVY8bGiqE4+"
        "NhTy5eNAKes0VHQIbAu7yu17GS25Da+t0WHSMGAyO1zSSBfJ7W0ZNLmNLYMGGuR2s6Aqt5OlZXKbWJ0vt4OV4+W2rlp5"
        "uV3DnpURlNuuMoQwy7BX006VUZTbo5Iwuf0pppLbmuLsaSypgdx+1COm4dxq35zTmwGFIeUyX0uaxlQuz60FNtC2unZn"
        "Ribl8liMjEfCQ+DkpsEFe0PuprzdE4IXIwzzy+WlUl7FyUXK5eDjpCFpfNL3q6FGceQ0WaVeTnOT1kpr5TRWXLKcliYN"
        "1Zbk9FKmbRp4FBHzgLWQ00CR9fK2LZJY3o4FWkAmb6tKBi+Rt0ddc0CQw/djUJDDrFppDg5yWFTuHoHrg4S8fGVJ5WUp"
        "6MjTXZ5sDh6wnDw9tec5kMi38zGYgBr5a4s65sAi//XH4MI/5gATW5E/BxmcETdiQXnAHHR44Bx4zjBzTTkv+m8A2q72"
        "vD/6QMQCl51+3wGJVmfhzDRsYA5ObAguYmPvA5WfzGFSSACiTCLmwEVi3gYv7S19HcCaa82EtMGMxDISkOA5qJHwt4GN"
        "QrwNblhUigSlVjVOx1UhS2nS2nDvTl0b9LaXjeNJesGXf/3C1y01CAIEKIOlMKsVkpd9XVGDItwAYMAqNeGaAEIhARJK"
        "iblafpxeQKO0AK7Ey4+1C4iQHICk6bkKXFnkI+d3UKVD83i2gAylAuhS8NQQAL76SN4Av7pktgYAsjTC8mO9agw0nwYp"
        "Lswlsrc7KPsJMmpKQ6F2NFZJRG6VRnsbrCObiuLPQVun2z4G7kLNsmODatzaba6SSZCGLseTZmGTYBsXD4ceDvQj5TAC"
        "wDExvi0fz4og3gZ5JlGIg5VBIHPQB3NvA/8kGqQZwpmDf9rfIqK3AwCYYvUvLa/9qkxCYPOgAEJ7OzA4hwGX8P47QIAI"
        "IZs4m9+02IlxHjDESWXNuDrVrOE7V1EnAkmLdQABwfKtLXRW31LmlxAQ7zyoKCgdZihzelIZ9ztJjhxWPyWKPCXi5nm6"
        "cf8Jwb8deBykxb2yrCUlmYaoL1/rjOq8XmeEyR6tI6z6mK+2LS0/ln9+AIHIjsQ="
    )),
    "IQ3_XXS": ((256, 4), (
        "eNpFkzEOQzEIQxdGRkZGRkZm7n+sPpMv9UdW0jQBYxwzswAF3M0SrL/NAJ7M/Jlr1sAZCXQ4gIdbx7sYwMut+h9Eo4D7"
        "CxjAMyzBAm9m0BsXeYGSBuhgvUnoYiqrYu6CS3G+ON+cb/KCbuscqxnurxUYkLXms8c4H31RFh3RuGJI4wW+kFecGOtT"
        "kRFvIVa6raFNS1b7io9PAM/0KTCsYdHAGkR7gUEc32Z/CIFI9YSSOv4kPNEk1cRLiv6XWFShd2KKgYZSJ6EWoPmJrOt+"
        "0Z/g+tCaRgQyPeKqvvw1oUBnISNA9Q06Ws2+OrvsbaBldL1i7Sp/RauVaJY97H3Ni6+BGkWSASqNzVMbCiQE+wTTR6No"
        "a7FHJ66TDePObpj5pEYiaiaGGLnhlKtOZoAFoItFFrPElYRhwASW4DcJuqDDEW+cNEWF2ukzFU4qOSDkgtRsNOwzGC4d"
        "IRw63PZj/4SidA0cBOHCxoTdkqPbU6YcVN0Ts8LIajOgRgbw0aBP/A4UvApH7HSRZr2iba/Deg2QWZ6hDP0aA0N4neHl"
        "RiUTM71YCKwEs0lSSJm6V6zXhheRZPYHxKhj+Q=="
    )),
    "IQ3_S": ((512, 4), (
        "eNpFlYuKxTAIRAkiIiL+/9/uGe1yKUPaNPU1o33vPQMOCsy7DQMOEvR3wECBCJ6TLVBggPFxyECzDwxDCeYzqMtBfsYN"
        "1OckwAAL9kDi1HBawOec6+sC8wUSoIE5+66g/CXw5BkMMIINBTysApdZ4JcEPJ4DI5kADTLZL/bBNO+Gs3PJhuUbYCSd"
        "wIOkk31gXxEUYaqKTqSgQVAUyyKm4gh7zd6wcpk1dlmj+YR1ehlQlikmnHvQIILnYr+uoHZ0WH7FtSufFZiv2JRF6Rpp"
        "mdLBveFebg2TS4TdEW2tlQTm3Af7cRsiykXWcG6ONF0FBhCkJXARmW4Bqrhv9uaMqYJksVHq4rANIDHi4zlhtHke3qI6"
        "Konl3AuDxMIzwmiJo9itC0wZh12AkI1Z7ot7b2JqfLBm811vAjC7FVLkBGcVrMkziSHWFZutOsSiGDjxKctcq0qe9wBJ"
        "SVSSEaGuJLxOBqLfoXMFC3Ven3BFy9vs5Z1nrJWKSfoqgedXWEzksq8TuABo3Ceu2OjaB5Cg51wD6ECpmyz2ixQhEY6+"
        "OUTEFd59JKGkbRadInAkD2nJPY1TI4UTFQ1EIvikibLwyTpqqMZXrzIpnFexttQusqm4X8MFgaHZDc6WaTHEG7tg7Vov"
        "aDfC2FaKkVDUNv0TjLoU2YaUYJvRSoSmJVEo7bmGlgLFhi7SpXlPYG/Vg/utRCiy9SzhcRCfdGlxPwonV4yoZotmslR0"
        "UGck0IRCc/gqqsJK9JkVLQPDSqdZnpDRGvHMsobOdpBoaogA1EC1nyoECWSTOzrU9ppcjM5txQ1GjKuFShGrIYp7IEmG"
        "pjDSQTIp9UTcgIIm5M/9+E4pNZGSkUpFuEpCxDvEFAqf5IgBbm1yJ9ao0UjemwKo86KTAYY/JpnNsgXHxKNpS/TbmTuO"
        "dxBijTc8Y6z7DKphVcDSdLZVulgqtaJaTo0cvjIupLpF1hSftxJATYFdZMQbDqis2GQaAEqBrSwiLU0gKZNFJ6lGr3hT"
        "AqZz0KNIaj5uu/HfezEi6eZGyRoZK3AU0KomVloXNeUcxUB6aKqRTMsB5eNt8o7IAGFisVpT/2UzgPirfEM+79e4w556"
        "6XezQ1+/ifWgIcUHiAVajMA11l1/mdH0bo0PjQd1QP03nBQYKzZqwl8GSiUlXyrxQ/n4gdC72zUK4Q/ZMDHN"
    )),
    "IQ1_S": ((2048, 8), (
        "eNp1W4tWJEsII///0ew6lQTC6J7rxdaeflRBCAG73z/QVuUPQFtd/H2egHMiaIsfKF2RHwRtFeJCOBcE7f/T4wY4N4Jv"
        "+Pnvc7fi89Z6END+3PZzTPtz+eLH33nP/vz4c8wHr3oWfIH6XPFd8H2OxwDPb/A5sF8YtP9NLADOQoD25257YXAWCLQ/"
        "rweuN/hY4PO9Y8RC4iwoaH8uw/uC14kFx1l40NbZANB+noLffv4H2nobgrMxJfvOfI//fo59C22YvuDvKzYStJ+PL0/8"
        "nPb5fdsj3yNXbHjRQseo8GTQViEcBLSzFM9BqtJhQFt2HPC8Z6FjpGP9LBO4rr85GmirjuN9bvz8F+/67xi0nwehHyxH"
        "/fjBclgcx5VTcVF8Eo5Dg/az6yA+gKsJPv1yeBzHB+0HF1Yg4AQEaN/aEQ9WoHzcDAx0EAcwLivkKdnSMSLAPtsDLj+4"
        "/OByv/uA148AxAlEfX2WYQUmToCCthio9SLjPQ6fD1zHHbha+s/lVyAD+nlFYOMEOBToga7lYJQTHhRy6F+AqBsd4c0l"
        "76UXavcGULzqHavgp+u4atkH9OygfTD0AGT/RkD1YKceXry7CbBqXwG0AraihY5RkYkeDDAQ3+fBz/FJmKEK8WQvXF72"
        "AdcZzHTgxUD0BJ8LfB5wvUG02QAL2ud+8+YCXtA+N5ncSoxwbPUG1wXMAhcGeTMouE1c3OJiPAxZDzM7IIAvWugYPCbw"
        "v2XcCaDB50Rk+Hq2aD8PVozmB4bYO69EUrJ4Vrlaj6hYlodoTfQFfQ/+nh4EeVIhEhSQHtazBFVct+15OAmsaKFjJjQg"
        "PVUJrmihY2TiE2T3bEEkRCgx2vMrEmXRQsfgMTKRgvblw4kgQQdzc8PHjA1+Nfg97fOQ53+bwUFMblyJCZq/p3XkMpFD"
        "CR38uawS/Huxh8cr4RctZEkAAFoSgaokAD8GC7P0jvWSjhFF4IdaoIAhEHKajpuTOGE+LKIB2gKtQu0TUYwjMC4WIUGP"
        "jxeIahvxCjxvIL9WCIvICBlFaIoWOgaPkYSn3oY8PgY+LZ+bzwdeLwgRPfHxr/feEGfA8qnPBUF/WilLS1VIIgXaKhIr"
        "8Pjd6d2eHyZ0gRkAvO+zeLajChtiJg4hbOmoHsD8PMRNpICsfEBYQdCbVQ7BwyF6YmOPLQ3xE5t5eXqIoNiGIbonR0xW"
        "VBYTpRviSJQ26nWgxmRKRTmjltEJRgMJ3cOG5RWYXTuEVG9FRDF2a41xCCtonYKYuUEi++gkSB9fpt5LCtqXl8H6bAgv"
        "DvEFrVKdiDCxhPmYfrAIck1ID4moeXImA4ItwcpBhdmUQ6xfPgXzKP1gn6Kcp70GgogrRcu1xGhEzEv2AYJX9qUXMJ2A"
        "S7AJ/LNF+xwDhOlhSiL6oH1wPJSBzJseR0zj+mIzLS1FsUAw86KFCoZHPRjqruAfLEwhgVNQqFYQd+hdNK1CQ+Tf1KYX"
        "aQHjfBUiOAUJTmGCU6CAlktnRqnChZjqvVbqkGvIw9+2DgNVoQPatx2M46VYgAXQq7+4f2A8r8IIp0DSK/SK2V0o6cvU"
        "j4wYLKDeYzGOV0GFU1hpid7HptDCKbhAa+2it+pkecwyliK+UqaqP2QpJr0p2FzFdsg/1VHtTYmFI/MceedUOapmVMV8"
        "yzsVbN2yjSuKTllGcozkl5LsUimrSD5xRdK/yyhGRrGNZlbPbG+Z48oY5pKUJyw/CGmFWkc2kDzwoGcVtCzLy2JqZXls"
        "ESDL11u2+oxTjrriEuKf8rNEPkQKkGWnt1ygL3DuDSqrbDzloksjQUNluVenvDM3FFdRblBM1inMT5nlVNNZPnllTnnk"
        "At5lUUc5U6d8cZkCF/pRlqj88CudcsLlQ2WZoDKARHbKAEudtwxImu9a4A/6LtpuJVYSWR263knPS/T80HDRbjODSlo9"
        "lblKAsjjgh5f+lukvVMyyxVEV0VTyRXQQR8NPZX0UDTQHn7pn0vzpG9ftM3JS2B86BYIBla4k1a5Vjs0aujToUtKoQqF"
        "Q48uLRIdshBEOiT6U6I9ojeXxhz6UtQ5TV+kmJCuFOnKq1pWLd2/04Cb7p3emYmUvo0oTJ83PZ4u01eatMiv2qyyi6Lu"
        "h0XOyrRlqOlMR3XSj4tWpQ2c9CASa0EsVGCpuJMGBP+9tenvNGAQrVAbR2CrI7TJaY4KaNiuhOc6cGwf7IRdu2onvF44"
        "rQOfVsg64bEOHAruRgLrgKc6cCQYGvghzODAiqvdDrj4Cw6c4xXOorJ1BMYThq4+GF4KK7Pw/j086oTDyoDh3k51nW5q"
        "9+xgO27CuLbq393PGbbSnYw9x23sA51uUGe762yvtxW5vXW201njCqkqJSq3o87y32Wvr+Um2mhZkctbdZaxcrnqLI9D"
        "ovK167yOk1XnY/txKx+rzu29S+fyduo6QnHlj/1p/cMRkvUDIDulOqErT8QRnvVBnAt0nQuBUh9SqK4jWOtGOAL2vXFX"
        "PgDOg0joppLISp10g/u8hfBCPnhXvkAvrXIL5bU0IDHH/cLUqS2o/7UA4l69cj3oHlt4r4U9G3q1cDjCvBYSZ0G7zsJS"
        "uJfSUiPFhpBPyYh873sjwI1AIzYEtA3+nFYNgdo97rVhahTUaRRo416tPRvXu9m1NrIrNxSn0VCn4QCJ85Ubj84N76Fg"
        "sfF9Nx7ZUZGCJUeQNFKngVG7qNiOUukYXekgOI7SG6wXZexKB8JpjOgLx7G60sFwHa3depJjheN1pQPqEtTv39FyTM+a"
        "HAeFeh/HQfGHo6oxU7Jd4cB6hV7vvJVDIQ2FvEeL18gI6Pii4AoAnvpULjBOIiB6TS/BQyY3INw46orA0JJ3TJ1MwHRM"
        "i2CaF085s3hKfd/iU69Zk+nak2X+EnhWUOuPQMTvAYkbmNsZtGirEgYDFDdAe3dh3G1x6a7ugboFHao6XPPWcllsTLiB"
        "3VvNXIEe6tgEunuKqOhcathEQNBLW9rA0KuW2kDRlYCBAxwQltEX0AhAaWeeXRWPpKbSsaMadbXprcgqEa4SLa5GFTWz"
        "LhfAcICsKwEMB8g6WNhwzAry8A1wXQl0OIAHOeVI0r8CIA4QQrYRwEjUcENTHQS3LsqTXfR+emV42Wi/dRqhksy1il0J"
        "tPlW8FP1Ad6n84CNfJAXTIsfsBLEMysarlqCbkQDFrLQMYEd5R6PNF8PbyzAF/a66Y3DUE5DV08qEd0ids9MxE4MvXo4"
        "Fi9WA9ijfX7zbAyr+OlNqjGpTK7QJ8E4KRC81VDGH4mnh2llIuo1k0CxEEtDlxKnBNVdkah6XWordmZw0A62Sm7wc+Dn"
        "sHe4cwzZjW6chjdO41u9FzHEM97rxriGTW7C7BzDdeNcLaM6DXScRrqaOmagvUTrGXulKKqprEnMEmfUYuwcV3XiRsUY"
        "qhN553jpd0JHNvQVQTfBd453ugWulpmYdOd4pnuG6n1Jq5EyO4QBMSiAMzCgllydwQGcAQKcQQITjo5xP3UPTDzk8mcM"
        "zzEkCciEpEOtc5NDBMWidU1Pco2HwapLxbiXNazOMS0jl6Adh+gIUzvI4Ez2dI4/aezJrSol2zqDEQILLY4Q0+NAYjUd"
        "Yz4mVMixniFYOY7jSzprKAvomdmyIGoJdTwhrKjvHGNxid05luIetryHvcYheF0x0PFF+N7djQk4Ax9qGavC6xzf8Blq"
        "9tZuKq6WTN/xClWIPb03fm7EwzUZjR7NxMX0IqJtTtLYJY8pA8cNOscK/EYKQhHZzrEAH6jXbaKb7X2XWJ3td6+UvkSM"
        "O9vnXkm1yz3S19H2NlU39VEF3dGW/iLcne1jE29cAp5tXg+N/EXMO6ebTdQ1iFNnEEepV6HWu8myCL2aGCL2ne1Pi4kV"
        "U51DBbVV4qidbUOT8sr2nif7OqfXYBKgpNQxtTXUk07Z+yKrcOhsd7mAUGSIcd0CorONBAq5/lOJzjaQZ8xVaCji3J3v"
        "aIu419DZ1jDD62xbOBVWdF2nUOlsM/gdOtsGjngP6yAHpqTYdMr37hqpIOqU4c1ATf0bWSilHO7CqVPGNoOVXN0pP1tc"
        "75SVzXg7VVtTTKWSTpnXDNlct7cqNwNhlbKo17RSfXIxc2RNQ1alTAkgJ09N6jpUCRwZEPijMOzVW92TrOioQv0wt4DU"
        "ABsf3INswnrICqtSvnIHWKydeqv/dkms0qxRrK43e5reptiQ2AwqZBlrAMMSesspltCcpVjZdMoh/pubTpnDhW4nKnFI"
        "YArgThTxTJTkBkVzR9RNodwpF7jykldpt+uU+TiFtDlnluX2TRXDLqcryuFFDhEdeYGzQFPgpiDqr0I8C/BeMbErx86y"
        "zMxB5ZjKrc4yysxCZZPLo45yxxKp3rCzDDEzEUdQzHaWEWYuKhuWUDBDT2swUhWxhlcgmzR/Rllq//WD6bgprVKTBIhO"
        "umxxx3T4DGDCg5gk/Y+OmjJ10sslaAQNHM8gJHTSOl9MXEvY10nLfIpomP+YUDSo9zTaHgAN+mGGqOkm044cvkcnvbDw"
        "ctI0Tpq24KK0K1dWF11p8gownWnJSscVZJQGVDu3OwBbRJ4Ik6gpGBemuVjvgEdLJC5CCIudcAaTnA74wYEfgjV44/mT"
        "gj7CkHKAMYalGPfEX53hbkaPM2CLM2ircFT13Bk2RqBO93eFIHdXLu50W3/JTcXmNTJh92r8KmyJPWn7le21ragUvLo3"
        "mo8YhTMIjDMQjDMYrMeWQNZ5e68uzuCwPq7TO3/ss/TvHzM5DA8="
    )),
}


@lru_cache(maxsize=None)
def grid(type_name: str) -> np.ndarray:
    """The grid of `type_name` (IQ1_M shares IQ1_S's) as a read-only int8 (n_points, width)."""
    shape, text = _PACKED["IQ1_S" if type_name == "IQ1_M" else type_name]
    g = np.frombuffer(zlib.decompress(base64.b64decode("".join(text))), np.int8).reshape(shape)
    g.flags.writeable = False
    return g
