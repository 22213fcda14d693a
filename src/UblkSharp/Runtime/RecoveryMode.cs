using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>What the kernel does with a device's IO when its daemon dies.</summary>
public enum RecoveryMode
{
    /// <summary>The device dies with its daemon: IO fails and the block device goes away.</summary>
    Off,

    /// <summary>UBLK_F_USER_RECOVERY: new IO is held until a new daemon recovers the device; IO the dead daemon held fails.</summary>
    On,

    /// <summary>UBLK_F_USER_RECOVERY_REISSUE as well: IO the dead daemon held is reissued to the new one, so nothing fails.</summary>
    Reissue,

    /// <summary>UBLK_F_USER_RECOVERY_FAIL_IO (Linux 6.13+): IO fails while no daemon serves, but the device stays recoverable.</summary>
    FailIo,
}

public static class RecoveryModes
{
    public static UblkFeatures Flags(this RecoveryMode mode) => mode switch
    {
        RecoveryMode.On => UblkFeatures.UserRecovery,
        RecoveryMode.Reissue => UblkFeatures.UserRecovery | UblkFeatures.UserRecoveryReissue,
        RecoveryMode.FailIo => UblkFeatures.UserRecovery | UblkFeatures.UserRecoveryFailIo,
        _ => UblkFeatures.None,
    };

    public static RecoveryMode Parse(string text) => text switch
    {
        "off" => RecoveryMode.Off,
        "on" => RecoveryMode.On,
        "reissue" => RecoveryMode.Reissue,
        "fail-io" => RecoveryMode.FailIo,
        _ => throw new ArgumentException($"bad recovery mode '{text}': use off, on, reissue or fail-io"),
    };

    public static string Name(this RecoveryMode mode) => mode switch
    {
        RecoveryMode.On => "on",
        RecoveryMode.Reissue => "reissue",
        RecoveryMode.FailIo => "fail-io",
        _ => "off",
    };

    /// <summary>The mode a device's negotiated flags describe.</summary>
    public static RecoveryMode FromFlags(UblkFeatures flags)
        => (flags & UblkFeatures.UserRecovery) == 0 ? RecoveryMode.Off
        : (flags & UblkFeatures.UserRecoveryReissue) != 0 ? RecoveryMode.Reissue
        : (flags & UblkFeatures.UserRecoveryFailIo) != 0 ? RecoveryMode.FailIo
        : RecoveryMode.On;
}
