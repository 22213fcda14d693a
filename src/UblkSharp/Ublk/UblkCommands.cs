namespace UblkSharp.Ublk;

/// <summary>ioctl-encoded command numbers (UBLK_U_CMD_*, UBLK_U_IO_*), as the kernel has accepted since 6.4.</summary>
public static class UblkCommands
{
    private const uint IocWrite = 1, IocRead = 2;

    private static uint Ioc(uint dir, uint nr, uint size) => (dir << 30) | (size << 16) | ((uint)'u' << 8) | nr;

    private static uint Ctrl(uint dir, uint nr) => Ioc(dir, nr, 32);

    private static uint Io(uint nr) => Ioc(IocRead | IocWrite, nr, 16);

    public static readonly uint GetQueueAffinity = Ctrl(IocRead, 0x01);
    public static readonly uint GetDevInfo = Ctrl(IocRead, 0x02);
    public static readonly uint AddDev = Ctrl(IocRead | IocWrite, 0x04);
    public static readonly uint DelDev = Ctrl(IocRead | IocWrite, 0x05);
    public static readonly uint StartDev = Ctrl(IocRead | IocWrite, 0x06);
    public static readonly uint StopDev = Ctrl(IocRead | IocWrite, 0x07);
    public static readonly uint SetParams = Ctrl(IocRead | IocWrite, 0x08);
    public static readonly uint GetParams = Ctrl(IocRead, 0x09);
    public static readonly uint StartUserRecovery = Ctrl(IocRead | IocWrite, 0x10);
    public static readonly uint EndUserRecovery = Ctrl(IocRead | IocWrite, 0x11);
    public static readonly uint GetDevInfo2 = Ctrl(IocRead, 0x12);
    public static readonly uint GetFeatures = Ctrl(IocRead, 0x13);
    public static readonly uint DelDevAsync = Ctrl(IocRead, 0x14);
    public static readonly uint UpdateSize = Ctrl(IocRead | IocWrite, 0x15);
    public static readonly uint QuiesceDev = Ctrl(IocRead | IocWrite, 0x16);
    public static readonly uint TryStopDev = Ctrl(IocRead | IocWrite, 0x17);

    public static readonly uint FetchReq = Io(0x20);
    public static readonly uint CommitAndFetchReq = Io(0x21);
    public static readonly uint NeedGetData = Io(0x22);

    // SUPPORT_ZERO_COPY (Linux 6.15+): the command's addr is the slot of the issuing ring's buffer
    // table that gets (or gives back) the request's pages.
    public static readonly uint RegisterIoBuf = Io(0x23);
    public static readonly uint UnregisterIoBuf = Io(0x24);

    // BATCH_IO (Linux 7.0+): struct ublk_batch_io is 16 bytes, as struct ublksrv_io_cmd.
    public static readonly uint PrepIoCmds = Io(0x25);
    public static readonly uint CommitIoCmds = Io(0x26);
    public static readonly uint FetchIoCmds = Io(0x27);

    /// <summary>CQE res of an IO command when the device is going away.</summary>
    public const int IoResAbort = -19; // -ENODEV

    /// <summary>
    /// UBLK_AUTO_BUF_REG_FALLBACK: a request whose buffer the driver cannot install still comes,
    /// with <see cref="IoFlags.NeedRegBuf"/> set, instead of failing unseen.
    /// </summary>
    public const byte AutoBufRegFallback = 1 << 0;

    /// <summary>
    /// The SQE's addr (not the command's) of FETCH and COMMIT_AND_FETCH under AUTO_BUF_REG (struct ublk_auto_buf_reg): the slot of
    /// the ring's buffer table the driver installs the request's pages at, and flags.
    /// </summary>
    public static ulong AutoBufReg(ushort index, byte flags) => index | ((ulong)flags << 16);

    /// <summary>CQE res of an IO command asking for NEED_GET_DATA.</summary>
    public const int IoResNeedGetData = 1;

    public const int MaxQueueDepth = 4096;
    public const int MaxQueues = 4096;

    /// <summary>
    /// Where a request's data is in /dev/ublkcN under UBLK_F_USER_COPY (UBLKSRV_IO_BUF_OFFSET, the
    /// queue from bit 41, the tag from bit 25); the request's byte offset is added to it.
    /// </summary>
    public static long UserCopyOffset(int queueId, int tag) => 0x8000_0000L + ((long)queueId << 41) + ((long)tag << 25);

    /// <summary>Where queue q's descriptor array is mapped in /dev/ublkcN.</summary>
    public static long DescriptorOffset(int queueId) => queueId * RoundUpToPage(MaxQueueDepth * 24L);

    /// <summary>The length of a queue's descriptor mapping; the kernel requires exactly this.</summary>
    public static long DescriptorLength(int depth) => RoundUpToPage(depth * 24L);

    private static long RoundUpToPage(long n)
    {
        long page = Environment.SystemPageSize;
        return (n + page - 1) / page * page;
    }
}
