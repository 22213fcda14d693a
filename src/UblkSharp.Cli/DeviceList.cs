using System.Globalization;

namespace UblkSharp.Cli;

/// <summary>The ublk devices the kernel has, from /sys/class/ublk-char (ublkcN exists from ADD_DEV to DEL_DEV).</summary>
internal static class DeviceList
{
    public static uint[] Ids()
    {
        const string dir = "/sys/class/ublk-char";
        if (!Directory.Exists(dir))
        {
            return [];
        }
        return [.. Directory.GetFileSystemEntries(dir, "ublkc*")
            .Select(p => Path.GetFileName(p)["ublkc".Length..])
            .Select(s => uint.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out var id) ? (uint?)id : null)
            .Where(id => id is not null)
            .Select(id => id!.Value)
            .Order()];
    }
}
