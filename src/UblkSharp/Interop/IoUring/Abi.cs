using System.Runtime.InteropServices;

namespace UblkSharp.Interop.IoUring;

// Mirrors of <linux/io_uring.h>. Offsets are asserted against the C header by the tests.

[Flags]
public enum SetupFlags : uint
{
    None = 0,
    IoPoll = 1u << 0,
    SqPoll = 1u << 1,
    SqAff = 1u << 2,
    CqSize = 1u << 3,
    Clamp = 1u << 4,
    AttachWq = 1u << 5,
    RDisabled = 1u << 6,
    SubmitAll = 1u << 7,
    CoopTaskrun = 1u << 8,
    TaskrunFlag = 1u << 9,
    Sqe128 = 1u << 10,
    Cqe32 = 1u << 11,
    SingleIssuer = 1u << 12,
    DeferTaskrun = 1u << 13,
}

[Flags]
public enum RingFeatures : uint
{
    None = 0,
    SingleMmap = 1u << 0,
    NoDrop = 1u << 1,
    SubmitStable = 1u << 2,
    RwCurPos = 1u << 3,
    CurPersonality = 1u << 4,
    FastPoll = 1u << 5,
    Poll32Bits = 1u << 6,
    SqpollNonfixed = 1u << 7,
    ExtArg = 1u << 8,
    NativeWorkers = 1u << 9,
    RsrcTags = 1u << 10,
    CqeSkip = 1u << 11,
    LinkedFile = 1u << 12,
}

public enum Opcode : byte
{
    Nop = 0,
    Readv = 1,
    Writev = 2,
    Fsync = 3,
    ReadFixed = 4,
    WriteFixed = 5,
    PollAdd = 6,
    PollRemove = 7,
    SyncFileRange = 8,
    SendMsg = 9,
    RecvMsg = 10,
    Timeout = 11,
    TimeoutRemove = 12,
    AsyncCancel = 14,
    LinkTimeout = 15,
    Fallocate = 17,
    Read = 22,
    Write = 23,
    Send = 26,
    Recv = 27,
    UringCmd = 46,
}

[Flags]
public enum SqeFlags : byte
{
    None = 0,
    FixedFile = 1 << 0,
    IoDrain = 1 << 1,
    IoLink = 1 << 2,
    IoHardlink = 1 << 3,
    Async = 1 << 4,
    BufferSelect = 1 << 5,
    CqeSkipSuccess = 1 << 6,
}

/// <summary>Per-op flags for FSYNC.</summary>
[Flags]
public enum FsyncFlags : uint
{
    None = 0,
    DataSync = 1,
}

/// <summary>Per-op flags for READ/WRITE (preadv2/pwritev2 RWF_*).</summary>
[Flags]
public enum RwFlags : uint
{
    None = 0,
    HiPri = 0x1,
    DSync = 0x2,
    Sync = 0x4,
    NoWait = 0x8,
    Append = 0x10,
}

/// <summary>fallocate(2) modes, as used by discard and write-zeroes.</summary>
[Flags]
public enum FallocateMode : int
{
    None = 0,
    KeepSize = 0x01,
    PunchHole = 0x02,
    ZeroRange = 0x10,
}

/// <summary>Flags for ASYNC_CANCEL.</summary>
[Flags]
public enum CancelFlags : uint
{
    None = 0,
    All = 1u << 0,
    Fd = 1u << 1,
    Any = 1u << 2,
}

/// <summary>Flags for TIMEOUT.</summary>
[Flags]
public enum TimeoutFlags : uint
{
    None = 0,
    Absolute = 1u << 0,
}

internal static class EnterFlags
{
    public const uint GetEvents = 1u << 0;
    public const uint SqWakeup = 1u << 1;
    public const uint SqWait = 1u << 2;
    public const uint ExtArg = 1u << 3;
}

internal static class SqRingFlags
{
    public const uint NeedWakeup = 1u << 0;
    public const uint CqOverflow = 1u << 1;
    public const uint Taskrun = 1u << 2;
}

internal enum RegisterOp : uint
{
    Buffers = 0,
    UnregisterBuffers = 1,
    Files = 2,
    UnregisterFiles = 3,
    EventFd = 4,
    UnregisterEventFd = 5,
    FilesUpdate = 6,
    Probe = 8,
    Buffers2 = 15,
    BuffersUpdate = 16,
    PbufRing = 22,
    UnregisterPbufRing = 23,
}

/// <summary>struct io_uring_buf_reg (IORING_REGISTER_PBUF_RING).</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct BufReg
{
    public ulong ring_addr;
    public uint ring_entries;
    public ushort bgid;
    public ushort flags;
    public fixed ulong resv[3];
}

/// <summary>struct io_uring_buf: one entry of a provided buffer ring; entry 0's last 2 bytes are the ring's tail.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct ProvidedBuffer
{
    public ulong addr;
    public uint len;
    public ushort bid;
    public ushort resv;
}

/// <summary>uring_cmd_flags of a URING_CMD SQE.</summary>
public static class UringCmdFlags
{
    /// <summary>IORING_URING_CMD_MULTISHOT (Linux 7.0+): one command, many completions, each in a provided buffer.</summary>
    public const uint Multishot = 1u << 1;
}

/// <summary>CQE flags (IORING_CQE_F_*).</summary>
public static class CqeFlags
{
    /// <summary>The upper 16 bits hold the id of the provided buffer used.</summary>
    public const uint Buffer = 1u << 0;

    /// <summary>A multishot request stays armed: more completions follow.</summary>
    public const uint More = 1u << 1;

    /// <summary>Incremental buffer ring: the buffer was not used up and stays at the head (its next data follows this one's).</summary>
    public const uint BufMore = 1u << 4;

    public const int BufferShift = 16;
}

/// <summary>struct io_uring_rsrc_register (IORING_REGISTER_BUFFERS2 and FILES2).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct RsrcRegister
{
    public const uint RegisterSparse = 1u << 0;

    public uint nr;
    public uint flags;
    public ulong resv2;
    public ulong data;
    public ulong tags;
}

/// <summary>struct io_uring_rsrc_update2 (IORING_REGISTER_BUFFERS_UPDATE).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct RsrcUpdate2
{
    public uint offset;
    public uint resv;
    public ulong data;
    public ulong tags;
    public uint nr;
    public uint resv2;
}

internal static class MmapOffsets
{
    public const long SqRing = 0;
    public const long CqRing = 0x8000000;
    public const long Sqes = 0x10000000;
}

[StructLayout(LayoutKind.Sequential)]
public struct SqringOffsets
{
    public uint head;
    public uint tail;
    public uint ring_mask;
    public uint ring_entries;
    public uint flags;
    public uint dropped;
    public uint array;
    public uint resv1;
    public ulong resv2;
}

[StructLayout(LayoutKind.Sequential)]
public struct CqringOffsets
{
    public uint head;
    public uint tail;
    public uint ring_mask;
    public uint ring_entries;
    public uint overflow;
    public uint cqes;
    public uint flags;
    public uint resv1;
    public ulong resv2;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct IoUringParams
{
    public uint sq_entries;
    public uint cq_entries;
    public uint flags;
    public uint sq_thread_cpu;
    public uint sq_thread_idle;
    public uint features;
    public uint wq_fd;
    public fixed uint resv[3];
    public SqringOffsets sq_off;
    public CqringOffsets cq_off;
}

/// <summary>A 64-byte submission queue entry. With SQE128 the command area runs 80 bytes from offset 48.</summary>
[StructLayout(LayoutKind.Explicit, Size = 64)]
public unsafe partial struct Sqe
{
    [FieldOffset(0)] public Opcode opcode;
    [FieldOffset(1)] public SqeFlags flags;
    [FieldOffset(2)] public ushort ioprio;
    [FieldOffset(4)] public int fd;
    [FieldOffset(8)] public ulong off;
    [FieldOffset(8)] public ulong addr2;
    [FieldOffset(8)] public uint cmd_op;
    [FieldOffset(12)] public uint __pad1;
    [FieldOffset(16)] public ulong addr;
    [FieldOffset(24)] public uint len;
    /// <summary>The op-specific flags union (rw_flags, fsync_flags, timeout_flags, cancel_flags, uring_cmd_flags).</summary>
    [FieldOffset(28)] public uint op_flags;
    [FieldOffset(32)] public ulong user_data;
    [FieldOffset(40)] public ushort buf_index;
    /// <summary>With <see cref="SqeFlags.BufferSelect"/>: the provided buffer group to take the buffer from (a union with buf_index).</summary>
    [FieldOffset(40)] public ushort buf_group;
    [FieldOffset(42)] public ushort personality;
    [FieldOffset(44)] public uint file_index;
    [FieldOffset(48)] public ulong addr3;
    [FieldOffset(56)] public ulong __pad2;

    /// <summary>Offset of the URING_CMD payload (sqe->cmd).</summary>
    public const int CmdOffset = 48;
}

/// <summary>A completion queue entry (16 bytes; CQE32 rings append 16 more).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct Cqe
{
    public ulong user_data;
    public int res;
    public uint flags;
}

[StructLayout(LayoutKind.Sequential)]
public struct KernelTimespec
{
    public long tv_sec;
    public long tv_nsec;

    public static KernelTimespec From(TimeSpan t)
    {
        var ticks = Math.Max(0, t.Ticks);
        return new KernelTimespec { tv_sec = ticks / TimeSpan.TicksPerSecond, tv_nsec = ticks % TimeSpan.TicksPerSecond * 100 };
    }
}

[StructLayout(LayoutKind.Sequential)]
public struct GeteventsArg
{
    public ulong sigmask;
    public uint sigmask_sz;
    public uint pad;
    public ulong ts;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct Iovec
{
    public void* iov_base;
    public nuint iov_len;
}

/// <summary>struct msghdr (x86-64 and arm64 LP64 layout), for SENDMSG/RECVMSG.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct MsgHdr
{
    public void* msg_name;
    public uint msg_namelen;
    public Iovec* msg_iov;
    public nuint msg_iovlen;
    public void* msg_control;
    public nuint msg_controllen;
    public int msg_flags;
}

/// <summary>send/recv flags (MSG_*) for SEND, RECV and their msg forms.</summary>
[Flags]
public enum MsgFlags : uint
{
    None = 0,
    DontWait = 0x40,
    WaitAll = 0x100,
    /// <summary>No SIGPIPE on a connection the peer closed: the send fails with EPIPE instead.</summary>
    NoSignal = 0x4000,
}
