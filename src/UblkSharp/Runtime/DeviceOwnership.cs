using System.Globalization;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>
/// Hands a user's device nodes to that user. The kernel records who added an unprivileged device
/// (UNPRIVILEGED_DEV: owner_uid, owner_gid) but creates /dev/ublkcN and /dev/ublkbN as root's, like
/// any node; the udev rule that `ublksharp setup-unprivileged` installs runs this for each new node,
/// as ublksrv's ublk_chown.sh does. A device root added is left alone.
/// </summary>
public static class DeviceOwnership
{
    /// <summary>
    /// Gives /dev/<paramref name="nodeName"/> (ublkcN or ublkbN) to the user who added device N, if
    /// it is an unprivileged device. Returns that uid, or null for root's device. GET_DEV_INFO2
    /// reads the owner: root may ask it of any device.
    /// </summary>
    public static uint? HandOver(ControlDevice control, string nodeName)
    {
        ArgumentNullException.ThrowIfNull(control);
        var id = IdOf(nodeName);
        var info = control.GetDeviceInfo2(id);
        if ((info.flags & (ulong)UblkFeatures.UnprivilegedDev) == 0)
        {
            return null;
        }
        var path = "/dev/" + nodeName;
        if (Libc.chown(path, info.owner_uid, info.owner_gid) < 0)
        {
            throw new ErrnoException(Marshal.GetLastPInvokeError(), $"chown {path} to {info.owner_uid}:{info.owner_gid}");
        }
        return info.owner_uid;
    }

    /// <summary>The device id of a node name, ublkcN or ublkbN; throws <see cref="ArgumentException"/> for anything else.</summary>
    public static uint IdOf(string nodeName)
    {
        ArgumentNullException.ThrowIfNull(nodeName);
        if (nodeName.Length > 5 && (nodeName.StartsWith("ublkc", StringComparison.Ordinal) || nodeName.StartsWith("ublkb", StringComparison.Ordinal))
            && uint.TryParse(nodeName.AsSpan(5), NumberStyles.None, CultureInfo.InvariantCulture, out var id))
        {
            return id;
        }
        throw new ArgumentException($"'{nodeName}' is not a ublk device node name (ublkcN or ublkbN)");
    }
}
