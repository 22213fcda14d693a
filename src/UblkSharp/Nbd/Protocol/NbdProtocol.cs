using UblkSharp.Interop;

namespace UblkSharp.Nbd.Protocol;

/// <summary>
/// The NBD wire protocol's numbers (NetworkBlockDevice/nbd doc/proto.md): fixed newstyle
/// handshake, simple and structured replies. Every field is big-endian on the wire.
/// </summary>
public static class NbdProtocol
{
    public const int DefaultPort = 10809;

    // Handshake.
    public const ulong NbdMagic = 0x4e42444d41474943;      // "NBDMAGIC"
    public const ulong OptionMagic = 0x49484156454F5054;   // "IHAVEOPT"
    public const ulong OptionReplyMagic = 0x3e889045565a9;

    public const ushort FlagFixedNewstyle = 1 << 0;
    public const ushort FlagNoZeroes = 1 << 1;
    public const uint ClientFlagFixedNewstyle = 1 << 0;
    public const uint ClientFlagNoZeroes = 1 << 1;

    // Options.
    public const uint OptExportName = 1;
    public const uint OptAbort = 2;
    public const uint OptList = 3;
    public const uint OptStartTls = 5;
    public const uint OptInfo = 6;
    public const uint OptGo = 7;
    public const uint OptStructuredReply = 8;
    public const uint OptListMetaContext = 9;
    public const uint OptSetMetaContext = 10;

    // Option replies.
    public const uint RepAck = 1;
    public const uint RepServer = 2;
    public const uint RepInfo = 3;
    public const uint RepMetaContext = 4;
    public const uint RepErrUnsup = 0x80000000 | 1;
    public const uint RepErrPolicy = 0x80000000 | 2;
    public const uint RepErrInvalid = 0x80000000 | 3;
    public const uint RepErrPlatform = 0x80000000 | 4;
    public const uint RepErrTlsReqd = 0x80000000 | 5;
    public const uint RepErrUnknown = 0x80000000 | 6;
    public const uint RepErrShutdown = 0x80000000 | 7;
    public const uint RepErrBlockSizeReqd = 0x80000000 | 8;
    public const uint RepErrTooBig = 0x80000000 | 9;

    // NBD_OPT_INFO / NBD_OPT_GO information types.
    public const ushort InfoExport = 0;
    public const ushort InfoName = 1;
    public const ushort InfoDescription = 2;
    public const ushort InfoBlockSize = 3;

    // Transmission flags.
    public const ushort FlagHasFlags = 1 << 0;
    public const ushort FlagReadOnly = 1 << 1;
    public const ushort FlagSendFlush = 1 << 2;
    public const ushort FlagSendFua = 1 << 3;
    public const ushort FlagRotational = 1 << 4;
    public const ushort FlagSendTrim = 1 << 5;
    public const ushort FlagSendWriteZeroes = 1 << 6;
    public const ushort FlagSendDf = 1 << 7;
    public const ushort FlagCanMultiConn = 1 << 8;
    public const ushort FlagSendResize = 1 << 9;
    public const ushort FlagSendCache = 1 << 10;
    public const ushort FlagSendFastZero = 1 << 11;

    // Transmission.
    public const uint RequestMagic = 0x25609513;
    public const uint SimpleReplyMagic = 0x67446698;
    public const uint StructuredReplyMagic = 0x668e33ef;
    public const int RequestSize = 28;
    public const int SimpleReplySize = 16;
    public const int StructuredReplySize = 20;

    public const ushort CmdRead = 0;
    public const ushort CmdWrite = 1;
    public const ushort CmdDisc = 2;
    public const ushort CmdFlush = 3;
    public const ushort CmdTrim = 4;
    public const ushort CmdCache = 5;
    public const ushort CmdWriteZeroes = 6;
    public const ushort CmdBlockStatus = 7;

    public const ushort CmdFlagFua = 1 << 0;
    public const ushort CmdFlagNoHole = 1 << 1;
    public const ushort CmdFlagDf = 1 << 2;
    public const ushort CmdFlagReqOne = 1 << 3;
    public const ushort CmdFlagFastZero = 1 << 4;
    public const ushort CmdFlagsKnown = CmdFlagFua | CmdFlagNoHole | CmdFlagDf | CmdFlagReqOne | CmdFlagFastZero;

    public const ushort ReplyFlagDone = 1 << 0;
    public const ushort ReplyTypeNone = 0;
    public const ushort ReplyTypeOffsetData = 1;
    public const ushort ReplyTypeOffsetHole = 2;
    public const ushort ReplyTypeBlockStatus = 5;
    public const ushort ReplyTypeError = (1 << 15) | 1;
    public const ushort ReplyTypeErrorOffset = (1 << 15) | 2;

    // base:allocation flags.
    public const uint StateHole = 1 << 0;
    public const uint StateZero = 1 << 1;

    public const string BaseAllocation = "base:allocation";

    // Errors on the wire (the protocol fixes these values, whatever the platform's errno).
    public const uint EPERM = 1;
    public const uint EIO = 5;
    public const uint ENOMEM = 12;
    public const uint EINVAL = 22;
    public const uint ENOSPC = 28;
    public const uint EOVERFLOW = 75;
    public const uint ENOTSUP = 95;
    public const uint ESHUTDOWN = 108;

    /// <summary>The longest string (export name, description, message) the protocol allows.</summary>
    public const int MaxString = 4096;

    /// <summary>
    /// Maps a target's negative errno to the NBD error for a request with <paramref name="commandFlags"/>.
    /// EOPNOTSUPP is ENOTSUP only for a FAST_ZERO request (the one place the protocol allows it).
    /// </summary>
    public static uint ToNbdError(int negativeErrno, ushort commandFlags)
    {
        const int EDQUOT = 122;
        const int ESHUTDOWN_ = 108;
        return -negativeErrno switch
        {
            0 => 0,
            Errno.EPERM or Errno.EROFS or Errno.EACCES => EPERM,
            Errno.ENOMEM => ENOMEM,
            Errno.ENOSPC or Errno.EFBIG or EDQUOT => ENOSPC,
            Errno.EINVAL => EINVAL,
            Errno.EOVERFLOW => (commandFlags & CmdFlagDf) != 0 ? EOVERFLOW : EINVAL,
            Errno.EOPNOTSUPP => (commandFlags & CmdFlagFastZero) != 0 ? ENOTSUP : EINVAL,
            ESHUTDOWN_ => ESHUTDOWN,
            _ => EIO,
        };
    }

    /// <summary>Maps an NBD error from a server back to a negative errno.</summary>
    public static int FromNbdError(uint error) => error switch
    {
        0 => 0,
        EPERM => -Errno.EPERM,
        EIO => -Errno.EIO,
        ENOMEM => -Errno.ENOMEM,
        EINVAL => -Errno.EINVAL,
        ENOSPC => -Errno.ENOSPC,
        EOVERFLOW => -Errno.EOVERFLOW,
        ENOTSUP => -Errno.EOPNOTSUPP,
        ESHUTDOWN => -108,
        _ => -Errno.EIO,
    };

    public static string CommandName(ushort type) => type switch
    {
        CmdRead => "READ",
        CmdWrite => "WRITE",
        CmdDisc => "DISC",
        CmdFlush => "FLUSH",
        CmdTrim => "TRIM",
        CmdCache => "CACHE",
        CmdWriteZeroes => "WRITE_ZEROES",
        CmdBlockStatus => "BLOCK_STATUS",
        _ => $"command {type}",
    };

    public static string OptionName(uint option) => option switch
    {
        OptExportName => "EXPORT_NAME",
        OptAbort => "ABORT",
        OptList => "LIST",
        OptStartTls => "STARTTLS",
        OptInfo => "INFO",
        OptGo => "GO",
        OptStructuredReply => "STRUCTURED_REPLY",
        OptListMetaContext => "LIST_META_CONTEXT",
        OptSetMetaContext => "SET_META_CONTEXT",
        _ => $"option {option}",
    };
}
