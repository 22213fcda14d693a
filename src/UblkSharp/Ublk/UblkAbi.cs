using System.Runtime.InteropServices;

namespace UblkSharp.Ublk;

// Mirrors of <linux/ublk_cmd.h>, laid out with explicit offsets copied from the kernel header
// (ublksrv's own copy drifted once; tests assert every size and offset).

/// <summary>sqe->cmd of a control command (struct ublksrv_ctrl_cmd).</summary>
[StructLayout(LayoutKind.Explicit, Size = 32)]
public struct CtrlCmd
{
    [FieldOffset(0)] public uint dev_id;
    [FieldOffset(4)] public ushort queue_id;
    [FieldOffset(6)] public ushort len;
    [FieldOffset(8)] public ulong addr;
    [FieldOffset(16)] public ulong data;
    [FieldOffset(24)] public ushort dev_path_len;
    [FieldOffset(26)] public ushort pad;
    [FieldOffset(28)] public uint reserved;
}

/// <summary>struct ublksrv_ctrl_dev_info.</summary>
[StructLayout(LayoutKind.Explicit, Size = 64)]
public struct DevInfo
{
    [FieldOffset(0)] public ushort nr_hw_queues;
    [FieldOffset(2)] public ushort queue_depth;
    [FieldOffset(4)] public ushort state;
    [FieldOffset(6)] public ushort pad0;
    [FieldOffset(8)] public uint max_io_buf_bytes;
    [FieldOffset(12)] public uint dev_id;
    [FieldOffset(16)] public int ublksrv_pid;
    [FieldOffset(20)] public uint pad1;
    [FieldOffset(24)] public ulong flags;
    [FieldOffset(32)] public ulong ublksrv_flags;
    [FieldOffset(40)] public uint owner_uid;
    [FieldOffset(44)] public uint owner_gid;
    [FieldOffset(48)] public ulong reserved1;
    [FieldOffset(56)] public ulong reserved2;
}

/// <summary>struct ublk_param_basic.</summary>
[StructLayout(LayoutKind.Explicit, Size = 32)]
public struct ParamBasic
{
    public const uint AttrReadOnly = 1u << 0;
    public const uint AttrRotational = 1u << 1;
    public const uint AttrVolatileCache = 1u << 2;
    public const uint AttrFua = 1u << 3;

    [FieldOffset(0)] public uint attrs;
    [FieldOffset(4)] public byte logical_bs_shift;
    [FieldOffset(5)] public byte physical_bs_shift;
    [FieldOffset(6)] public byte io_opt_shift;
    [FieldOffset(7)] public byte io_min_shift;
    [FieldOffset(8)] public uint max_sectors;
    [FieldOffset(12)] public uint chunk_sectors;
    [FieldOffset(16)] public ulong dev_sectors;
    [FieldOffset(24)] public ulong virt_boundary_mask;
}

/// <summary>struct ublk_param_discard.</summary>
[StructLayout(LayoutKind.Explicit, Size = 20)]
public struct ParamDiscard
{
    [FieldOffset(0)] public uint discard_alignment;
    [FieldOffset(4)] public uint discard_granularity;
    [FieldOffset(8)] public uint max_discard_sectors;
    [FieldOffset(12)] public uint max_write_zeroes_sectors;
    [FieldOffset(16)] public ushort max_discard_segments;
    [FieldOffset(18)] public ushort reserved0;
}

/// <summary>struct ublk_param_devt (read-only: filled in by GET_PARAMS, refused by SET_PARAMS).</summary>
[StructLayout(LayoutKind.Explicit, Size = 16)]
public struct ParamDevt
{
    [FieldOffset(0)] public uint char_major;
    [FieldOffset(4)] public uint char_minor;
    [FieldOffset(8)] public uint disk_major;
    [FieldOffset(12)] public uint disk_minor;
}

/// <summary>struct ublk_param_zoned (6.6+).</summary>
[StructLayout(LayoutKind.Explicit, Size = 32)]
public struct ParamZoned
{
    [FieldOffset(0)] public uint max_open_zones;
    [FieldOffset(4)] public uint max_active_zones;
    [FieldOffset(8)] public uint max_zone_append_sectors;
}

/// <summary>struct ublk_param_dma_align (6.15+).</summary>
[StructLayout(LayoutKind.Explicit, Size = 8)]
public struct ParamDmaAlign
{
    [FieldOffset(0)] public uint alignment;
}

/// <summary>struct ublk_param_segment (6.15+).</summary>
[StructLayout(LayoutKind.Explicit, Size = 16)]
public struct ParamSegment
{
    [FieldOffset(0)] public ulong seg_boundary_mask;
    [FieldOffset(8)] public uint max_segment_size;
    [FieldOffset(12)] public ushort max_segments;
}

/// <summary>
/// struct ublk_params up to the 6.15 members. 6.12 copies the first 112 bytes and drops the
/// types it does not know, so one layout serves every kernel.
/// </summary>
[StructLayout(LayoutKind.Explicit, Size = 136)]
public struct UblkParams
{
    public const uint TypeBasic = 1u << 0;
    public const uint TypeDiscard = 1u << 1;
    public const uint TypeDevt = 1u << 2;
    public const uint TypeZoned = 1u << 3;
    public const uint TypeDmaAlign = 1u << 4;
    public const uint TypeSegment = 1u << 5;

    /// <summary>The size 6.12 knows: everything up to and including the zoned member.</summary>
    public const int Size612 = 108;

    [FieldOffset(0)] public uint len;
    [FieldOffset(4)] public uint types;
    [FieldOffset(8)] public ParamBasic basic;
    [FieldOffset(40)] public ParamDiscard discard;
    [FieldOffset(60)] public ParamDevt devt;
    [FieldOffset(76)] public ParamZoned zoned;
    [FieldOffset(108)] public ParamDmaAlign dma;
    [FieldOffset(120)] public ParamSegment seg;
}

/// <summary>One entry of a queue's mmapped descriptor array (struct ublksrv_io_desc).</summary>
[StructLayout(LayoutKind.Explicit, Size = 24)]
public struct IoDesc
{
    [FieldOffset(0)] public uint op_flags;
    [FieldOffset(4)] public uint nr_sectors;
    [FieldOffset(8)] public ulong start_sector;
    [FieldOffset(16)] public ulong addr;

    public readonly IoOp Op => (IoOp)(op_flags & 0xff);

    public readonly IoFlags Flags => (IoFlags)(op_flags & ~0xffu);
}

/// <summary>sqe->cmd of an IO command (struct ublksrv_io_cmd).</summary>
[StructLayout(LayoutKind.Explicit, Size = 16)]
public struct IoCmd
{
    [FieldOffset(0)] public ushort q_id;
    [FieldOffset(2)] public ushort tag;
    [FieldOffset(4)] public int result;
    [FieldOffset(8)] public ulong addr;
}

/// <summary>sqe->cmd of a batch IO command (struct ublk_batch_io, BATCH_IO): PREP_IO_CMDS, COMMIT_IO_CMDS, FETCH_IO_CMDS.</summary>
[StructLayout(LayoutKind.Explicit, Size = 16)]
public struct BatchIoCmd
{
    /// <summary>Elements carry the tag's buffer address after their 8-byte header (copy mode).</summary>
    public const ushort HasBufAddr = 1 << 1;

    /// <summary>AUTO_BUF_REG's fallback for every element's buffer index.</summary>
    public const ushort AutoBufRegFallback = 1 << 2;

    [FieldOffset(0)] public ushort q_id;
    [FieldOffset(2)] public ushort flags;
    [FieldOffset(4)] public ushort nr_elem;
    [FieldOffset(6)] public byte elem_bytes;
    [FieldOffset(7)] public byte reserved;
    [FieldOffset(8)] public ulong reserved2;
}

/// <summary>struct ublk_elem_header: one tag of a PREP_IO_CMDS or COMMIT_IO_CMDS buffer (8 bytes, then the buffer address if <see cref="BatchIoCmd.HasBufAddr"/>).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct BatchElem
{
    public ushort tag;
    public ushort buf_index;
    public int result;
}

public enum IoOp : byte
{
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteSame = 4,
    WriteZeroes = 5,
    ZoneOpen = 10,
    ZoneClose = 11,
    ZoneFinish = 12,
    ZoneAppend = 13,
    ZoneResetAll = 14,
    ZoneReset = 15,
    ReportZones = 18,
}

[Flags]
public enum IoFlags : uint
{
    None = 0,
    FailfastDev = 1u << 8,
    FailfastTransport = 1u << 9,
    FailfastDriver = 1u << 10,
    Meta = 1u << 11,
    Fua = 1u << 13,
    NoUnmap = 1u << 15,
    Swap = 1u << 16,

    /// <summary>AUTO_BUF_REG with fallback: the driver could not install this request's buffer; it takes the copy path.</summary>
    NeedRegBuf = 1u << 17,
}

/// <summary>dev_info.state.</summary>
public enum DeviceState : ushort
{
    Dead = 0,
    Live = 1,
    Quiesced = 2,
    FailIo = 3,
}
