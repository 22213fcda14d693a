using System.Text;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;

namespace UblkSharp.Nbd;

/// <summary>
/// A target offered over NBD under a name. The same <see cref="BlockTarget"/> object may serve a
/// ublk device at the same time: both call its thread-safe methods.
/// </summary>
public sealed class NbdExport
{
    /// <summary>The largest READ or WRITE payload accepted (the protocol's portable maximum).</summary>
    public const int MaxPayload = 32 << 20;

    public NbdExport(string name, BlockTarget target, bool readOnly = false, string? description = null)
    {
        ArgumentNullException.ThrowIfNull(name);
        ArgumentNullException.ThrowIfNull(target);
        CheckString(name, "export name");
        CheckString(description ?? "", "export description");
        if (target.Size <= 0)
        {
            throw new ArgumentException($"an export needs a target with a positive size, not {target.Size}");
        }
        Name = name;
        Target = target;
        Description = description ?? $"{target.Kind} ({target.Size} bytes)";
        IsReadOnly = readOnly || target.IsReadOnly;
        // Capabilities are read once: the fill-in checks use reflection.
        CanTrim = !IsReadOnly && target.CanDiscard;
        CanWriteZeroes = !IsReadOnly && target.CanWriteZeroes;
        CanFastZero = CanWriteZeroes && target.CanFastZero;
        var lbs = target.LogicalBlockSize;
        MinimumBlockSize = lbs is >= 1 and <= 65536 && (lbs & (lbs - 1)) == 0 ? (uint)lbs : 512;
        PreferredBlockSize = (uint)Math.Max(Math.Max(target.PhysicalBlockSize, 4096), (int)MinimumBlockSize);
        var flags = NbdProtocol.FlagHasFlags | NbdProtocol.FlagSendCache;
        // Every BlockTarget is one object shared by all its callers, and its flush covers writes
        // completed through any of them (a multi-queue ublk device relies on the same), so several
        // connections may share it.
        flags |= NbdProtocol.FlagCanMultiConn;
        if (IsReadOnly)
        {
            flags |= NbdProtocol.FlagReadOnly;
        }
        else
        {
            flags |= NbdProtocol.FlagSendFlush | NbdProtocol.FlagSendFua;
            if (CanTrim)
            {
                flags |= NbdProtocol.FlagSendTrim;
            }
            if (CanWriteZeroes)
            {
                flags |= NbdProtocol.FlagSendWriteZeroes | NbdProtocol.FlagSendFastZero;
            }
        }
        if (target.IsRotational)
        {
            flags |= NbdProtocol.FlagRotational;
        }
        BaseFlags = (ushort)flags;
    }

    public string Name { get; }

    public string Description { get; }

    public BlockTarget Target { get; }

    public bool IsReadOnly { get; }

    public long Size => Target.Size;

    public bool CanTrim { get; }

    public bool CanWriteZeroes { get; }

    public bool CanFastZero { get; }

    public uint MinimumBlockSize { get; }

    public uint PreferredBlockSize { get; }

    /// <summary>Transmission flags, before the per-connection ones (DF needs structured replies).</summary>
    public ushort BaseFlags { get; }

    internal ushort TransmissionFlags(bool structuredReplies)
        => (ushort)(BaseFlags | (structuredReplies ? NbdProtocol.FlagSendDf : 0));

    private static void CheckString(string s, string what)
    {
        if (Encoding.UTF8.GetByteCount(s) > NbdProtocol.MaxString)
        {
            throw new ArgumentException($"the {what} is longer than {NbdProtocol.MaxString} bytes");
        }
        if (s.Contains('\0', StringComparison.Ordinal))
        {
            throw new ArgumentException($"the {what} contains a NUL character");
        }
    }
}
